"""The search driver: ask -> dispatch -> journal -> tell, then select and report.

Determinism: the run's root seed derives the optimizer seed, the DARE/DELLA mask seed (stored in
each recipe) and each split's item-subset seed; eval ids are positions (`g0003-02`), not times.

Never waste an evaluation: every result is journaled (fsync) the moment it arrives, and a recipe
whose cache key (canonical recipe + seed + task config) was already evaluated is answered from the
journal.

Resume is a replay: an optimizer is a deterministic function of its seed and the asks and tells it
has seen, so every start (new run or resume) builds a fresh optimizer and runs the same loop. A
generation already in the journal is re-asked, answered from the journal without a worker, and told
the journaled values (JSON floats round-trip exactly), so an interrupted run produces the same
genomes, fitnesses and final recipe as an uninterrupted one, and no optimizer state is ever saved or
unpickled. A re-asked genome that differs from the journaled one (other cma/optuna versions, an
edited journal) stops the resume instead of quietly continuing a different search.

Never die on a candidate: a genome that does not decode, a worker error, a NaN or a dead worker
is a failed evaluation with the penalty fitness and a reason in the journal.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import Recipe, dump_recipe, parse_recipe_text
from evomerge.scoring.confidence import weighted_ci95
from evomerge.search.fidelity import items_scored
from evomerge.search.identity import check_run_identity
from evomerge.search.objectives import PARETO_FILE, Objectives
from evomerge.search.optimizers import make_optimizer
from evomerge.search.payload import cache_key, derive_seed, make_payload, recipe_sha, sha256, source_recipe
from evomerge.search.racing import race
from evomerge.search.run import (
    BEST_FILE,
    FINAL_FILE,
    JOURNAL_FILE,
    SPACE_FILE,
    SUMMARY_FILE,
    RunDir,
)
from evomerge.search.space import SearchSpace
from evomerge.workers.candidate import Candidate, EvalResult, WorkerSpec

ExecutorFactory = Callable[[WorkerSpec, float, "float | None"], Any]


@dataclass
class Item:
    """One evaluation to journal: a genome of a generation, or a re-score in the final phase."""

    eval_id: str
    phase: str  # search | select | report
    split: str
    recipe: Recipe | None
    genome: list[float] | None = None
    generation: int | None = None
    index: int | None = None
    error: str | None = None  # decoding failed
    label: str | None = None  # report phase: "final" or a source model path
    window: tuple[int, int | None] | None = None  # staged evaluation: the item positions to score


@dataclass
class Progress:
    """What a display needs; the driver updates it and calls the observer after each record."""

    kind: str
    budget: int
    popsize: int
    generation: int = 0
    done: int = 0
    failed: int = 0
    evaluated_here: int = 0  # computed by a worker in this process (not replayed, not cached)
    best: float | None = None
    phase: str = "search"
    started: float = field(default_factory=time.monotonic)


def worker_spec(space: SearchSpace) -> WorkerSpec:
    """The worker factory of the space, given the models, tasks and task folders it will need."""
    cfg = space.config
    kwargs = {
        **cfg.worker.kwargs,
        "sources": list(dict.fromkeys(space.source_models + space.compared_models)),
        "tasks": [t.model_dump(mode="json") for t in cfg.tasks],
        "include_paths": list(cfg.include_paths),
    }
    return WorkerSpec(cfg.worker.factory, kwargs)


class Search:
    def __init__(
        self,
        run: RunDir,
        space: SearchSpace,
        executor_factory: ExecutorFactory,
        observer: Callable[[Progress, dict[str, Any] | None], None] | None = None,
    ):
        self.run = run
        self.space = space
        self.cfg = space.config
        self._make_executor = executor_factory
        self._executor: Any = None
        self.observer = observer or (lambda progress, record: None)
        self.journal = run.open_journal()
        self.records: dict[str, dict[str, Any]] = {}
        self.cache: dict[str, dict[str, Any]] = {}
        self.asked: dict[str, list[float]] = {}  # search eval id -> the genome journaled for it
        for record in self.journal.records():
            self._remember(record)
        self.mask_seed = derive_seed(self.cfg.seed, "mask")
        self.objectives = Objectives(self.cfg, space.catalog)
        budget = self.cfg.budget
        self.generations = max(1, budget.max_evals // space.popsize)
        self.progress = Progress(space.kind, self.generations * space.popsize, space.popsize)
        search = [r for r in self.records.values() if r["phase"] == "search"]
        self.progress.done = len(search)
        self.progress.failed = sum(r["status"] != "ok" for r in search)
        ok = [r["fitness"] for r in search if r["status"] == "ok"]
        self.progress.best = max(ok) if ok else None

    # -- top level -------------------------------------------------------------------------------

    def run_all(self) -> dict[str, Any]:
        try:
            self.search()
            return self.finish()
        finally:
            self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self.journal.close()

    def search(self) -> None:
        """Every generation: ask, evaluate (journaled ones replay without a worker), tell."""
        self._check_space()
        optimizer = make_optimizer(self.space, derive_seed(self.cfg.seed, "optimizer"), self.run.path)
        for generation in range(self.generations):
            self.progress.generation = generation
            genomes = optimizer.ask()
            items = [self._search_item(generation, i, g) for i, g in enumerate(genomes)]
            self._check_replay(items)
            journaled = len(self.records)
            records = race(self, items) if self.cfg.fidelity else self.evaluate(items)
            if generation == 0:
                self._stop_if_nothing_can_be_evaluated(records)
            optimizer.tell(genomes, self._told_values(optimizer, records))
            if len(self.records) > journaled:  # a replayed generation leaves pareto.json as it is
                self.write_pareto()
        self.progress.generation = self.generations

    def _stop_if_nothing_can_be_evaluated(self, records: list[dict[str, Any]]) -> None:
        """Every candidate of the first generation failing for one and the same reason is a fault of
        the setup (an unknown metric, a worker that cannot load), not of the genomes: stop, rather
        than spend the budget on penalties and exit 0."""
        reasons = {r.get("reason") for r in records}
        if records and all(r["status"] != "ok" for r in records) and len(reasons) == 1:
            raise EvomergeError(
                f"every candidate of generation 0 failed the same way: {reasons.pop()}; "
                "fix the cause (the space or the worker's environment), then resume"
            )

    def _check_space(self) -> None:
        check_run_identity(self.run, self.space)

    def _check_replay(self, items: list[Item]) -> None:
        """A journaled candidate must be re-asked bit for bit, or its journaled fitness would be told
        to a different search."""
        for item in items:
            journaled = self.asked.get(item.eval_id)
            if journaled is not None and journaled != item.genome:
                raise EvomergeError(
                    f"{self.run.path}: the optimizer no longer reproduces the run: it asked another genome "
                    f"for {item.eval_id} than {JOURNAL_FILE} holds (the cma/optuna versions changed since the "
                    "run started, or the journal was edited); resume with the versions the run started with"
                )

    def _search_item(self, generation: int, index: int, genome: list[float]) -> Item:
        eval_id = f"g{generation:04d}-{index:03d}"
        seed = self.mask_seed if self._mask_mode() == "run" else derive_seed(self.cfg.seed, "mask", eval_id)
        item = Item(eval_id, "search", self.cfg.splits.search, None, list(genome), generation, index)
        try:
            item.recipe = self.space.decode(genome, seed=seed)
        except EvomergeError as exc:
            item.error = f"decode: {exc}"
        return item

    def _told_values(self, optimizer: Any, records: list[dict[str, Any]]) -> list[Any]:
        """Fitnesses, or objective vectors (None: failed) for a multi-objective optimizer."""
        if getattr(optimizer, "objectives", 1) > 1:
            return [self.objectives.vector(r) for r in records]
        return [r["fitness"] for r in records]

    def write_pareto(self) -> None:
        """pareto.json from every search evaluation so far (runs with objectives only)."""
        if self.objectives:
            self.run.write_json(PARETO_FILE, self.objectives.document(self.records.values()))

    def _mask_mode(self) -> str:
        return self.cfg.ps.mask_seed if self.cfg.ps is not None else "run"

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, items: list[Item]) -> list[dict[str, Any]]:
        """A record per item, in item order: replayed from the journal, from the cache, or computed."""
        leaders: dict[str, Item] = {}
        followers: dict[str, list[Item]] = {}
        to_run: list[Candidate] = []
        for item in items:
            if item.eval_id in self.records:
                continue
            if item.recipe is None:
                self.append_record(item, None, status="failed", reason=item.error)
                continue
            payload = make_payload(
                item.recipe, self.cfg, item.split, full=item.phase not in ("search", "stage"), window=item.window
            )
            key = cache_key(payload)
            if key in self.cache:
                self.append_record(item, key, source=self.cache[key])
            elif key in leaders:
                followers[key].append(item)
            else:
                leaders[key] = item
                followers[key] = []
                to_run.append(Candidate(item.eval_id, payload))
        if to_run:
            executor = self._executor_or_start()
            by_id = {leaders[k].eval_id: k for k in leaders}
            executor.submit(to_run)
            for result in executor.as_completed():
                key = by_id[result.candidate_id]
                record = self.append_record(leaders[key], key, result=result)
                for follower in followers[key]:
                    self.append_record(follower, key, source=record)
        return [self.records[item.eval_id] for item in items]

    def _executor_or_start(self) -> Any:
        if self._executor is None:
            worker = self.cfg.worker
            try:
                self._executor = self._make_executor(worker_spec(self.space), worker.penalty, worker.timeout)
            except EvomergeError:
                raise
            except Exception as exc:  # the worker factory itself is broken: nothing can be evaluated
                first = (str(exc).strip().splitlines() or [""])[0]
                raise EvomergeError(
                    f"worker.factory: cannot build {worker.factory!r} ({type(exc).__name__}: {first})"
                ) from None
        return self._executor

    def append_record(
        self,
        item: Item,
        key: str | None,
        *,
        result: EvalResult | None = None,
        source: dict[str, Any] | None = None,
        status: str | None = None,
        reason: str | None = None,
        counted: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Journal one evaluation (computed, answered from another record, or failed) and update the
        progress; the fidelity race (racing.py) journals its candidates' records through it too."""
        record: dict[str, Any] = {
            "eval_id": item.eval_id,
            "phase": item.phase,
            "generation": item.generation,
            "index": item.index,
            "genome": item.genome,
            "recipe_sha": recipe_sha(item.recipe) if item.recipe else None,
            "cache_key": key,
            "seed": item.recipe.seed if item.recipe else None,
            "split": item.split,
            "label": item.label,
        }
        if result is not None:
            record.update(
                metrics=result.metrics,
                fitness=result.fitness,
                status=result.status,
                seconds=round(result.seconds, 6),
                worker=result.worker,
                reason=result.reason,
                attempts=result.attempts,
                cached_from=None,
            )
            if result.items:
                record["items"] = result.items
            if counted:
                self.progress.evaluated_here += 1
        elif source is not None:
            record.update(
                metrics=source["metrics"],
                fitness=source["fitness"],
                status=source["status"],
                seconds=0.0,
                worker=None,
                reason=source["reason"],
                attempts=0,
                cached_from=source["cached_from"] or source["eval_id"],
            )
            if source.get("items"):
                record["items"] = source["items"]
        else:
            record.update(
                metrics={},
                fitness=self.cfg.worker.penalty,
                status=status or "failed",
                seconds=0.0,
                worker=None,
                reason=reason,
                attempts=0,
                cached_from=None,
            )
        record.update(extra or {})
        record["recipe"] = dump_recipe(item.recipe) if item.recipe else None
        record["time"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.journal.append(record)
        self._remember(record)
        self._after_record(record)
        return record

    def _remember(self, record: dict[str, Any]) -> None:
        self.records[record["eval_id"]] = record
        if record["phase"] in ("search", "stage"):  # a stage record (`g0003-02/s1`) carries its candidate's genome
            self.asked.setdefault(record["eval_id"].partition("/")[0], record["genome"])
        if record["status"] == "ok" and record.get("cache_key") and record["cache_key"] not in self.cache:
            self.cache[record["cache_key"]] = record

    def _after_record(self, record: dict[str, Any]) -> None:
        if record["phase"] == "search":
            self.progress.done += 1
            self.progress.failed += record["status"] != "ok"
            if record["status"] == "ok" and (self.progress.best is None or record["fitness"] > self.progress.best):
                self.progress.best = record["fitness"]
                self.run.write_text(BEST_FILE, record["recipe"])
        self.observer(self.progress, record)

    # -- the end: select on the selection split, report on the report split ------------------------

    def top_k(self) -> list[dict[str, Any]]:
        """Best search records, one per distinct recipe, ties broken by eval order."""
        seen: set[str] = set()
        ranked = []
        ordered = sorted(
            (r for r in self.records.values() if r["phase"] == "search" and r["status"] == "ok"),
            key=lambda r: (-r["fitness"], r["eval_id"]),
        )
        for record in ordered:
            if record["recipe_sha"] not in seen:
                seen.add(record["recipe_sha"])
                ranked.append(record)
        return ranked[: self.cfg.budget.select_top_k]

    def finish(self) -> dict[str, Any]:
        self.write_pareto()
        self.progress.phase = "select"
        self.observer(self.progress, None)
        top = self.top_k()
        split = self.cfg.splits
        if not top:
            summary = {
                "final": None,
                "sources": {},
                "evaluations": self.progress.done,
                "failed": self.progress.failed,
                "reason": "no candidate evaluated successfully",
            }
            self.run.write_json(SUMMARY_FILE, summary)
            return summary
        items = [
            Item(
                f"select-{r['recipe_sha'][:16]}",
                "select",
                split.select,
                parse_recipe_text(r["recipe"]),
                r["genome"],
                r["generation"],
                r["index"],
                label=r["eval_id"],
            )
            for r in top
        ]
        top, items = self._with_incumbent(top, items)
        selected = self.evaluate(items)
        best_i = max(
            range(len(top)),
            key=lambda i: (selected[i]["status"] == "ok", selected[i]["fitness"], top[i]["fitness"], -i),
        )
        final_recipe = items[best_i].recipe
        assert final_recipe is not None
        self.run.write_text(FINAL_FILE, dump_recipe(final_recipe))
        self.progress.phase = "report"
        self.observer(self.progress, None)
        sha = recipe_sha(final_recipe)
        report_items = [Item(f"report-final-{sha[:16]}", "report", split.report, final_recipe, label="final")]
        for model in self.space.source_models:
            report_items.append(
                Item(f"report-source-{sha256(model)[:16]}", "report", split.report, source_recipe(model), label=model)
            )
        reports = self.evaluate(report_items)
        summary = self._summary(top[best_i], selected[best_i], reports)
        self.run.write_json(SUMMARY_FILE, summary)
        self.progress.phase = "done"
        self.observer(self.progress, None)
        return summary

    def _with_incumbent(self, top: list[dict], items: list[Item]) -> tuple[list[dict], list[Item]]:
        """A DFS search also offers its x0 path (the anchor model alone) to the selection, so the chosen
        path is never worse on the selection split than not re-routing at all (in PS+DFS: the PS model)."""
        if self.space.kind != "dfs":
            return top, items
        recipe = self.space.decode(self.space.x0)
        sha = recipe_sha(recipe)
        if any(r["recipe_sha"] == sha for r in top):
            return top, items
        x0 = list(self.space.x0)
        searched = self.evaluate(
            [Item(f"incumbent-{sha[:16]}", "select", self.cfg.splits.search, recipe, x0, label="incumbent")]
        )[0]
        item = Item(f"select-{sha[:16]}", "select", self.cfg.splits.select, recipe, x0, label="incumbent")
        return [*top, {**searched, "recipe": dump_recipe(recipe)}], [*items, item]

    def _summary(self, search_record: dict, select_record: dict, reports: list[dict]) -> dict[str, Any]:
        final, sources = reports[0], reports[1:]
        split = self.cfg.splits

        def score(record: dict) -> dict[str, Any]:
            out: dict[str, Any] = {
                "score": record["fitness"] if record["status"] == "ok" else None,
                "metrics": record["metrics"],
                "status": record["status"],
            }
            if record["status"] != "ok":
                out["reason"] = record["reason"]
            return out

        final_block = {
            "recipe": FINAL_FILE,
            "eval_id": search_record["eval_id"],
            split.search: {"score": search_record["fitness"]},
            split.select: score(select_record),
            split.report: score(final),
        }
        if final["status"] == "ok":
            final_block[split.report]["ci95"] = weighted_ci95(final["fitness"], final["metrics"], self.cfg.tasks)
        compared = set(self.space.compared_models)
        return {
            "final": final_block,
            "sources": {
                r["label"]: {"role": "source" if r["label"] in compared else "base", split.report: score(r)}
                for r in sources
            },
            "evaluations": self.progress.done,
            "failed": self.progress.failed,
            "items_scored": items_scored(self.records.values()),
            "kind": self.space.kind,
            "splits": {"search": split.search, "select": split.select, "report": split.report},
            "seed": self.cfg.seed,
            "space": SPACE_FILE,
        }


def journal_genomes(records: Iterable[dict[str, Any]]) -> list[tuple[str, list[float] | None, float]]:
    """(eval_id, genome, fitness) of the search phase in eval order (what resume tests compare)."""
    search = sorted((r for r in records if r["phase"] == "search"), key=lambda r: r["eval_id"])
    return [(r["eval_id"], r["genome"], r["fitness"]) for r in search]
