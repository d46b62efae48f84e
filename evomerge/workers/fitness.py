"""The search's fitness worker: materialise a recipe in memory, score it with lm-eval, sum metrics.

Built once per executor slot (in process or in a Ray actor) as

    FitnessWorker(sources=[model dirs], tasks=[{"name", "metric", "weight", "limit"}],
                  include_paths=[...], split="train", device="cpu", batch_size=64,
                  memory_budget="40GB", cache="budgeted")   # optional: docs/memory.md

It loads the sources once (`Materializer`) and the lm-eval task objects once per (tasks, split);
every candidate then costs a materialisation plus the forward passes. Payload of a candidate:

    {"recipe": {...},          # mergekit-schema recipe dict (PS `models:` or DFS `slices:`)
     "seed": 123 | None,       # DARE/DELLA mask seed (else the recipe's `seed`, else 0)
     "tasks": [{"name": "toy_add", "metric": "exact_match", "weight": 1.0, "limit": 100}],
     "split": "train",         # train | validation | test
     "limit": None,            # default items per task for tasks without their own `limit`
     "subset_seed": 456,       # seeds each task's fixed item subset (see lm_tasks.task_samples)
     "include_paths": [],      # extra lm-eval task folders
     "prompts": {...}}         # lm-eval's chat template / few-shot turns / system instruction
                               # (lm_tasks.PromptOptions; else the constructor's `prompts`)

`tasks`, `split` and `include_paths` default to the constructor's. The answer is
`EvalResult.success(id, fitness, metrics, timings)`: fitness = sum of weight * metric; metrics
`"<task>/<metric>"` for every metric lm-eval reports, `"<task>/n"` (items scored) and, with
`stderr=True`, `"<task>/<metric>_stderr"`; timings `materialize`, `eval` (lm-eval wall time),
`forward` (inside the model's forward passes) and `load_tasks` when tasks were built for this call.

A recipe that does not plan or build is a failed result with reason `merge failed: ...`; a
missing or NaN metric fails with the task and metric named. Out-of-memory errors and timeouts are
left to the executor's host, which turns them into failures too.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.candidates.materialize import Materialized, Materializer
from evomerge.errors import EvomergeError
from evomerge.io.allocator import keep_freed_memory
from evomerge.scoring.lm_tasks import PromptOptions
from evomerge.workers.candidate import Candidate, EvalResult


class TaskWeight(BaseModel):
    """One term of the fitness: `weight * <metric of task>`, over `limit` items (None: all)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    metric: str = "exact_match"
    weight: float = 1.0
    limit: int | None = Field(default=None, ge=1)


class FitnessPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: dict[str, Any]
    seed: int | None = None
    tasks: list[TaskWeight] | None = None
    split: Literal["train", "validation", "test"] | None = None
    limit: int | None = Field(default=None, ge=1)
    subset_seed: int | None = 0
    include_paths: list[str] | None = None
    prompts: PromptOptions | None = None
    window: list[int | None] | None = Field(default=None, min_length=2, max_length=2)  # staged evaluation
    order_seed: int = 0


class ForwardTimer:
    """Seconds spent inside a model's top-level forward calls (generate calls it once per step)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    @contextmanager
    def attached(self, model: Any) -> Iterator[ForwardTimer]:
        def before(module: Any, args: Any) -> None:
            self._started = time.perf_counter()

        def after(module: Any, args: Any, output: Any) -> None:
            self.seconds += time.perf_counter() - self._started

        self.seconds = 0.0
        handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class FitnessWorker:
    def __init__(
        self,
        sources: Sequence[str | Path] = (),
        tasks: Sequence[Mapping[str, Any]] = (),
        include_paths: Sequence[str | Path] = (),
        split: str = "train",
        device: str = "cpu",
        batch_size: int = 64,
        stderr: bool = False,
        torch_threads: int | None = None,
        search_dirs: Sequence[str | Path] = (),
        lean_generate: bool = True,
        prompts: Mapping[str, Any] | None = None,
        memory_budget: int | str | None = None,
        cache: str | None = None,
        mmap: bool = True,
    ):
        import torch

        from evomerge.io.tasks import quiet_offline_env

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        keep_freed_memory()  # candidates reallocate the same buffers: reuse them, no page faults
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-call progress bars flood actor logs
        quiet_offline_env()
        self.tasks = [TaskWeight.model_validate(dict(t)) for t in tasks]
        self.include_paths = [str(p) for p in include_paths]
        self.split = split
        self.device = device
        self.batch_size = batch_size
        self.stderr = stderr
        self.lean_generate = lean_generate
        try:
            self.prompts = PromptOptions.model_validate(dict(prompts or {}))
        except ValidationError as exc:
            raise EvomergeError(f"prompts: {_first_error(exc)}") from None
        self.materializer = Materializer(
            list(sources),
            device=device,
            search_dirs=[Path(p) for p in search_dirs],
            memory_budget=memory_budget,
            cache=cache,  # type: ignore[arg-type]
            mmap=mmap,
        )
        self._task_sets: dict[tuple[Any, ...], Any] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._prompt_caches: dict[Path, Any] = {}  # tokenizer path -> greedy_lm.PromptCache
        # (id(model), tokenizer path) -> (model, HFLM) for in-place targets: one resident model is
        # written by recipes with different `tokenizer_source`s, each scored with its own tokenizer
        self._lms: dict[tuple[int, Path], tuple[Any, Any]] = {}
        if self.tasks:
            self._loaded([t.name for t in self.tasks], split, self.include_paths)

    # -- the worker protocol ----------------------------------------------------------------------

    def evaluate(self, candidate: Candidate) -> EvalResult:
        try:
            payload = FitnessPayload.model_validate(candidate.payload)
        except ValidationError as exc:
            return EvalResult.failure(candidate.id, f"bad payload: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
        tasks = payload.tasks if payload.tasks is not None else self.tasks
        if not tasks:
            return EvalResult.failure(candidate.id, "bad payload: no tasks to score")
        split = payload.split or self.split
        include = payload.include_paths if payload.include_paths is not None else self.include_paths
        timings: dict[str, float] = {}

        started = time.perf_counter()
        try:
            built = self.materializer.apply(payload.recipe, payload.seed)
        except (EvomergeError, ValueError, KeyError) as exc:
            return EvalResult.failure(candidate.id, f"merge failed: {_one_line(exc)}")
        timings["materialize"] = time.perf_counter() - started

        started = time.perf_counter()
        loaded = self._loaded([t.name for t in tasks], split, include)
        if time.perf_counter() - started > 1e-3:
            timings["load_tasks"] = time.perf_counter() - started
        unknown = _unknown_metric(loaded, tasks)
        if unknown:
            return EvalResult.failure(candidate.id, unknown)
        if payload.window is not None:
            return self._score_window(candidate.id, built, loaded, tasks, payload, timings)
        results, timings["eval"], timings["forward"] = self._score(built, loaded, tasks, payload)
        metrics = flat_metrics(results, with_stderr=self.stderr)
        try:
            fitness = weighted_fitness(metrics, tasks)
        except ValueError as exc:
            return EvalResult.failure(candidate.id, str(exc), metrics)
        return EvalResult.success(candidate.id, fitness, metrics, timings)

    # -- pieces -------------------------------------------------------------------------------------

    def _score(
        self, built: Materialized, loaded: Any, tasks: Sequence[TaskWeight], payload: FitnessPayload
    ) -> tuple[dict[str, Any], float, float]:
        from evomerge.scoring.lm_tasks import score_tasks, task_samples

        limits = {t.name: t.limit if t.limit is not None else payload.limit for t in tasks}
        samples = task_samples(loaded, limits, payload.subset_seed)
        lm = self._lm(built)
        started = time.perf_counter()
        with ForwardTimer().attached(built.model) as timer:
            results = score_tasks(
                lm, loaded, samples=samples, log_samples=self.stderr, prompts=payload.prompts or self.prompts
            )
        return results, time.perf_counter() - started, timer.seconds

    def _score_window(
        self,
        candidate_id: str,
        built: Materialized,
        loaded: Any,
        tasks: Sequence[TaskWeight],
        payload: FitnessPayload,
        timings: dict[str, float],
    ) -> EvalResult:
        """Staged evaluation: score only the payload's window of items and report each item's score
        (`items`) and every task's item count (`task/n_full`); the search sums stages itself."""
        from evomerge.scoring.lm_tasks import item_scores, score_tasks, subset_tasks, window_samples

        assert payload.window is not None
        plain = [
            t.name
            for t in tasks
            if not isinstance(
                loaded.task_dict["tasks"][t.name].dataset[loaded.task_dict["tasks"][t.name].config.test_split], list
            )
        ]
        if plain:
            return EvalResult.failure(
                candidate_id,
                f"fidelity: task {plain[0]!r} has a process_docs hook; "
                "staged evaluation needs tasks whose docs are a plain list",
            )
        limits = {t.name: t.limit if t.limit is not None else payload.limit for t in tasks}
        samples, totals = window_samples(loaded, limits, payload.subset_seed, payload.window, payload.order_seed)
        scored = [name for name, items in samples.items() if items]
        metrics: dict[str, float] = {f"{t.name}/n_full": float(totals[t.name]) for t in tasks}
        items: dict[str, list[list[float]]] = {t.name: [] for t in tasks}
        timings["eval"] = timings["forward"] = 0.0
        if scored:
            lm = self._lm(built)
            started = time.perf_counter()
            with ForwardTimer().attached(built.model) as timer:
                results = score_tasks(
                    lm,
                    subset_tasks(loaded, scored),
                    samples={n: samples[n] for n in scored},
                    log_samples=True,
                    prompts=payload.prompts or self.prompts,
                )
            timings["eval"], timings["forward"] = time.perf_counter() - started, timer.seconds
            metrics.update(flat_metrics(results))
            items.update(item_scores(results, samples, {t.name: t.metric for t in tasks if t.name in scored}))
        fitness = 0.0
        for task in tasks:
            values = [score for _, score in items[task.name]]
            metrics[f"{task.name}/n"] = float(len(values))
            fitness += task.weight * (sum(values) / len(values) if values else 0.0)
        return EvalResult.success(candidate_id, fitness, metrics, timings, items=items)

    def _loaded(self, names: Sequence[str], split: str, include_paths: Sequence[str]) -> Any:
        from evomerge.scoring.lm_tasks import load_tasks

        key = (tuple(names), split, tuple(include_paths))
        if key not in self._task_sets:
            self._task_sets[key] = load_tasks(names, split=split, include_paths=[Path(p) for p in include_paths])
        return self._task_sets[key]

    def _lm(self, built: Materialized) -> Any:
        """An HFLM around the candidate; in-place targets keep theirs (the same object every time)."""
        from evomerge.scoring.lm_tasks import make_lm

        key = (id(built.model), built.tokenizer_path)
        cached = self._lms.get(key)
        if cached is not None and cached[0] is built.model:
            return cached[1]
        from evomerge.scoring.greedy_lm import PromptCache

        prompts = self._prompt_caches.setdefault(built.tokenizer_path, PromptCache())
        lm = make_lm(
            built.model,
            self._tokenizer(built.tokenizer_path),
            batch_size=self.batch_size,
            device=self.device,
            lean=self.lean_generate,
            prompt_cache=prompts,
        )
        if built.mode == "in_place":
            while len(self._lms) >= self.materializer.max_targets:  # evicted targets free their memory
                self._lms.pop(next(iter(self._lms)))
            self._lms[key] = (built.model, lm)
        return lm

    def _tokenizer(self, path: Path) -> Any:
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return self._tokenizers[path]


def flat_metrics(results: Mapping[str, Any], with_stderr: bool = False) -> dict[str, float]:
    """lm-eval results as `{"task/metric": value, "task/n": items}` (+ `_stderr` from the samples)."""
    from evomerge.scoring.lm_tasks import metric_values

    flat: dict[str, float] = {}
    for task, values in metric_values(dict(results)).items():
        for metric, value in values.items():
            flat[f"{task}/{metric}"] = value
        counts = results.get("n-samples", {}).get(task, {})
        if "effective" in counts:
            flat[f"{task}/n"] = float(counts["effective"])
        if with_stderr:
            for metric in values:
                stderr = _sample_stderr(results.get("samples", {}).get(task, []), metric)
                if stderr is not None:
                    flat[f"{task}/{metric}_stderr"] = stderr
    return flat


def _sample_stderr(samples: Sequence[Mapping[str, Any]], metric: str) -> float | None:
    values = [float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float))]
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def weighted_fitness(metrics: Mapping[str, float], tasks: Sequence[TaskWeight]) -> float:
    """sum(weight * metric); a missing or non-finite metric is an error naming it."""
    total = 0.0
    for task in tasks:
        key = f"{task.name}/{task.metric}"
        if key not in metrics:
            have = sorted(
                k.split("/", 1)[1]
                for k in metrics
                if k.startswith(f"{task.name}/") and not k.endswith(("/n", "_stderr"))
            )
            raise ValueError(f"metric {key!r} missing from lm-eval results (task has: {', '.join(have) or 'none'})")
        value = metrics[key]
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} is {value}")
        total += task.weight * value
    return total


def _unknown_metric(loaded: Any, tasks: Sequence[TaskWeight]) -> str | None:
    """A reason when a task's YAML does not declare the fitness metric (checked before scoring)."""
    for task in tasks:
        declared = getattr(loaded.task_dict["tasks"].get(task.name), "_metric_fn_list", None)
        if declared and task.metric not in declared:
            return (
                f"metric '{task.name}/{task.metric}' is not computed by task {task.name!r} "
                f"(its metrics: {', '.join(declared)})"
            )
    return None


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return (f"{type(exc).__name__}: {text}" if not isinstance(exc, EvomergeError) else text)[:500]
