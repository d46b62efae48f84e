"""lm-eval glue: load task objects once, score any in-memory model with them, offline.

Building lm-eval tasks costs far more than scoring a tiny model, so a worker loads them once
(`load_tasks`) and reuses the objects for every candidate (`score_tasks`). We use
`evaluator.evaluate` directly: unlike `simple_evaluate` it does not reseed the global RNGs, which
would otherwise freeze a CMA-ES that draws from them (reference/stack.md §4).
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.io.tasks import FEWSHOT_SEED, build_tasks


def quiet_lm_eval_logs() -> None:
    """lm-eval logs at ERROR only. Checked before setting: every `setLevel` clears the logging
    module's level caches, which costs a candidate evaluation a measurable fraction of a millisecond."""
    import logging

    logger = logging.getLogger("lm_eval")
    if logger.level != logging.ERROR:
        logger.setLevel(logging.ERROR)


class PromptOptions(BaseModel):
    """How lm-eval formats prompts, as `lm_eval --apply_chat_template [NAME] --fewshot_as_multiturn
    --system_instruction TEXT` sets it: the tokenizer's chat template around each prompt, few-shot
    examples as alternating user/assistant turns, a system message. `fewshot_as_multiturn` unset
    follows `apply_chat_template` (lm-eval's CLI default); set without a chat template it is refused,
    as lm-eval refuses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    apply_chat_template: bool | str = False  # a string names one of the tokenizer's templates
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> PromptOptions:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn: needs apply_chat_template (few-shot turns are chat messages)")
        return self

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of lm-eval's `evaluator.evaluate` (and `simple_evaluate`)."""
        multiturn = bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn
        return {
            "apply_chat_template": self.apply_chat_template,
            "fewshot_as_multiturn": multiturn,
            "system_instruction": self.system_instruction,
        }


@dataclass
class LoadedTasks:
    """lm-eval task objects built once, plus the split each one scores."""

    task_dict: dict[str, Any]
    split: str

    @property
    def names(self) -> list[str]:
        return list(self.task_dict["tasks"])

    def size(self, name: str) -> int:
        return len(self.task_dict["tasks"][name].eval_docs)


def load_tasks(names: Sequence[str], split: str = "test", include_paths: Sequence[Path] = ()) -> LoadedTasks:
    """Build the named tasks so that they score `split` (`evomerge.io.tasks.build_tasks`), with
    their docs held as plain lists and their requests and results cached for every candidate."""
    merged = build_tasks(names, split, include_paths)
    for task in merged["tasks"].values():
        _materialize_docs(task)
        task.build_all_requests = RequestCache(task)
        if isinstance(task.dataset[task.config.test_split], list):
            task.process_results = ResultCache(task)
    return LoadedTasks(merged, split)


class RequestCache:
    """Stands in for a task's `build_all_requests`: lm-eval builds the Instances (prompts, targets,
    generation kwargs) once per (docs shown, build arguments); later calls hand back the same
    Instances with their responses cleared. Building them is pure in the docs and the arguments, so
    every candidate would rebuild identical requests (a tenth of a toy evaluation).

    Two things make a build depend on more than that, and are pinned here:
    - few-shot examples are drawn from the task's sampler RNG, which lm-eval seeds once per
      `simple_evaluate` (1234) and which advances with every doc: each build starts from that seed,
      so a build equals the first build of a fresh `lm_eval` run on the same docs;
    - with a chat template lm-eval passes the LM's bound `apply_chat_template`, whose repr names the
      LM object's address (reused after it is freed): the key names the tokenizer instead (its
      identity, held by the entry, its template and the LM's template arguments).

    `docs_key` names the docs the task currently shows (`score_tasks` sets it: the subset's item
    indices, None for the whole split)."""

    MAX_ENTRIES = 64  # distinct (subset, arguments) pairs kept per task

    def __init__(self, task: Any) -> None:
        self.task = task
        self.build = task.build_all_requests  # lm-eval's bound method
        self.docs_key: tuple[int, ...] | None = None
        self.built: dict[tuple[Any, ...], tuple[Any, list[Any]]] = {}  # key -> (tokenizer held, instances)

    def __call__(self, **kwargs: Any) -> None:
        template = kwargs.get("chat_template")
        lm = getattr(template, "__self__", None)
        tokenizer = getattr(lm, "tokenizer", None)
        if template is not None and tokenizer is None:
            self.task.set_fewshot_seed(FEWSHOT_SEED)
            self.build(**kwargs)  # a chat template we cannot name: never cached
            return
        named = {k: v for k, v in kwargs.items() if k != "chat_template"}
        chat = (
            None
            if template is None
            else (id(tokenizer), repr(tokenizer.chat_template), repr(getattr(lm, "chat_template_args", None)))
        )
        key = (self.docs_key, repr(sorted(named.items())), chat)
        entry = self.built.get(key)
        if entry is None or entry[0] is not tokenizer:
            self.task.set_fewshot_seed(FEWSHOT_SEED)
            self.build(**kwargs)
            if len(self.built) >= self.MAX_ENTRIES:
                self.built.clear()
            self.built[key] = (tokenizer, self.task._instances)
            return
        instances = entry[1]
        for instance in instances:  # new containers: results logged by earlier calls keep theirs
            instance.resps = []
            instance.filtered_resps = {}
        self.task._instances = instances


class ResultCache:
    """Stands in for a task's `process_results`: the metrics of one (doc, responses) pair are
    computed once. A search answers the same items with the same few strings over and over, and
    lm-eval's metric functions (exact match with its regex and case options, acc, ...) are pure in
    the doc and the responses. Only for tasks whose docs are a resident list (`_materialize_docs`),
    so a doc's identity names it, and only for text responses (generated answers: they repeat;
    log-likelihoods hardly ever do); a hit returns the stored dict (lm-eval's `evaluate` only reads it)."""

    MAX_ENTRIES = 200_000

    def __init__(self, task: Any) -> None:
        self.compute = task.process_results  # lm-eval's bound method
        self.metrics: dict[tuple[int, tuple[str, ...]], tuple[Any, dict[str, Any]]] = {}

    def __call__(self, doc: Any, results: Any) -> dict[str, Any]:
        if not (isinstance(results, list) and all(isinstance(r, str) for r in results)):
            return self.compute(doc, results)
        key = (id(doc), tuple(results))
        hit = self.metrics.get(key)
        if hit is not None and hit[0] is doc:
            return hit[1]
        metrics = self.compute(doc, results)
        if len(self.metrics) >= self.MAX_ENTRIES:
            self.metrics.clear()
        self.metrics[key] = (doc, metrics)
        return metrics


def _materialize_docs(task: Any) -> None:
    """Hold the scored split as a list of plain dicts: lm-eval re-reads every Arrow row of the split
    on each evaluation (to pick `samples`), which costs more than scoring a tiny model's subset.
    Tasks with a `process_docs` hook keep their Dataset (the hook may need Dataset methods)."""
    if task.config.process_docs is None:
        key = task.config.test_split
        task.dataset[key] = list(task.dataset[key])


def seeded_subset(size: int, limit: int | None, seed: int) -> list[int] | None:
    """A fixed random subset of item indices (sorted), or None for all items."""
    if limit is None or limit >= size:
        return None
    return list(_seeded_subset(size, limit, seed))


@functools.lru_cache(maxsize=256)
def _seeded_subset(size: int, limit: int, seed: int) -> tuple[int, ...]:
    return tuple(sorted(random.Random(seed).sample(range(size), limit)))  # every candidate asks again


def task_seed(subset_seed: int, task: str) -> int:
    """The item-subset seed of one task: each task gets its own stream from one subset seed."""
    import hashlib

    digest = hashlib.blake2b(f"{subset_seed}\0{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def task_samples(
    tasks: LoadedTasks, limits: dict[str, int | None], subset_seed: int | None
) -> dict[str, list[int]] | None:
    """Item indices per task for `score_tasks`: a fixed seeded subset of `limits[task]` items
    (`subset_seed` None: the first items, as `evomerge eval --limit` does without a seed)."""
    samples: dict[str, list[int]] = {}
    for name in tasks.names:
        limit, size = limits.get(name), tasks.size(name)
        if limit is None or limit >= size:
            continue
        if subset_seed is None:
            samples[name] = list(range(limit))
        else:
            samples[name] = seeded_subset(size, limit, task_seed(subset_seed, name)) or []
    return samples or None


def window_items(items: Sequence[int], window: Sequence[int | None], seed: int) -> list[int]:
    """The item indices at positions [start, stop) of `items` shuffled with `seed` (a fixed order)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    start, stop = window
    return order[int(start or 0) : None if stop is None else int(stop)]


def window_samples(
    tasks: LoadedTasks,
    limits: dict[str, int | None],
    subset_seed: int | None,
    window: Sequence[int | None],
    order_seed: int,
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Staged evaluation: per task, positions [start, stop) of its search items (the `limit` subset,
    or every item) in a fixed seeded order; and each task's item count (what the last stage reaches)."""
    full = task_samples(tasks, limits, subset_seed) or {}
    samples, totals = {}, {}
    for name in tasks.names:
        items = full.get(name, list(range(tasks.size(name))))
        totals[name] = len(items)
        samples[name] = window_items(items, window, task_seed(order_seed, name))
    return samples, totals


def subset_tasks(tasks: LoadedTasks, names: Sequence[str]) -> LoadedTasks:
    """The same loaded task objects, only `names` of them (a window that is empty for some tasks)."""
    task_dict = {**tasks.task_dict, "tasks": {n: t for n, t in tasks.task_dict["tasks"].items() if n in names}}
    return LoadedTasks(task_dict, tasks.split)


def item_scores(
    results: dict[str, Any], samples: dict[str, list[int]], metrics: dict[str, str]
) -> dict[str, list[list[float]]]:
    """{task: [[item index, score of its fitness metric], ...]} from lm-eval's logged samples; a
    logged doc_id is a position in the docs shown (`samples[task]`), mapped back to the item index."""
    out: dict[str, list[list[float]]] = {}
    for task, metric in metrics.items():
        indices = samples.get(task, [])
        logged = results.get("samples", {}).get(task, [])
        out[task] = sorted([indices[int(entry["doc_id"])], float(entry[metric])] for entry in logged)
    return out


def make_lm(
    model: Any,
    tokenizer: Any,
    batch_size: int = 64,
    device: str | None = None,
    lean: bool = True,
    prompt_cache: Any = None,
):
    """An lm-eval LM around an already-built transformers model (no reload per candidate).

    Everything else is HFLM's default, as `lm_eval --model hf` sets it for the same directory: the
    maximum length is resolved by HFLM from the model config and tokenizer (`n_positions`, then
    `max_position_embeddings`, ..., then the tokenizer's `model_max_length`, else 2048), BOS as
    the tokenizer adds it.

    `lean=True`: greedy `generate_until` requests are decoded by `greedy_lm.GreedyHFLM`'s own loop
    (same outputs as HFLM, a fraction of the overhead); `lean=False`: HFLM's `generate`. Pass one
    `greedy_lm.PromptCache` per tokenizer to share prompt encodings across candidates."""
    from evomerge.scoring.greedy_lm import GreedyHFLM

    quiet_lm_eval_logs()
    device = device or str(next(model.parameters()).device)
    return GreedyHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
        lean=lean,
        prompt_cache=prompt_cache,
    )


def score_tasks(
    lm: Any,
    tasks: LoadedTasks,
    samples: dict[str, list[int]] | None = None,
    log_samples: bool = False,
    prompts: PromptOptions | None = None,
) -> dict[str, Any]:
    """Run lm-eval on resident task objects; returns lm-eval's result dict (never reseeds RNGs).
    `prompts`: chat template, few-shot turns and system instruction, as lm-eval's options."""
    from lm_eval import evaluator

    quiet_lm_eval_logs()
    samples = {k: v for k, v in (samples or {}).items() if v is not None}
    with _subset_docs(tasks, samples) as remaining:
        return evaluator.evaluate(
            lm=lm,
            task_dict=tasks.task_dict,
            samples=remaining or None,
            bootstrap_iters=0,
            log_samples=log_samples,
            verbosity="ERROR",
            **(prompts or PromptOptions()).evaluate_kwargs(),
        )


@contextlib.contextmanager
def _subset_docs(tasks: LoadedTasks, samples: dict[str, list[int]]) -> Iterator[dict[str, list[int]]]:
    """Score a subset by showing lm-eval only those docs (same docs, order and doc ids as its
    `samples` option, which instead scans the whole split per call). Yields the samples that could
    not be applied this way (tasks whose docs are not a plain list)."""
    swapped: list[tuple[Any, str, Any]] = []
    remaining: dict[str, list[int]] = {}
    try:
        for name, task in tasks.task_dict["tasks"].items():
            _set_docs_key(task, None)
            indices = samples.get(name)
            if indices is None:
                continue
            key = task.config.test_split
            docs = task.dataset[key]
            if not isinstance(docs, list):
                remaining[name] = indices
                continue
            swapped.append((task, key, docs))
            task.dataset[key] = [docs[i] for i in indices]
            _set_docs_key(task, tuple(indices))
        yield remaining
    finally:
        for task, key, docs in swapped:
            task.dataset[key] = docs
            _set_docs_key(task, None)


def _set_docs_key(task: Any, key: tuple[int, ...] | None) -> None:
    cache = task.__dict__.get("build_all_requests")
    if isinstance(cache, RequestCache):
        cache.docs_key = key


def metric_values(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, dropping stderr and alias entries."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))
        }
    return out
