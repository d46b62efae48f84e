"""Staged (multi-fidelity) evaluation of one generation: candidates race over growing windows of
items, and the ones that can no longer reach the front stop early (the statistics are in
`fidelity.py`). Stage records are journaled like any other; each candidate ends as one search
record whose fitness comes from every item it scored.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.search.fidelity import Estimate, estimate, merge_items, stage_windows, still_racing
from evomerge.workers.candidate import EvalResult

if TYPE_CHECKING:  # the driver calls race() with itself
    from evomerge.search.driver import Item, Search


def race(search: Search, items: list[Item]) -> list[dict[str, Any]]:
    """A generation raced over the fidelity stages (evomerge.search.fidelity): stage records
    (`g0003-02/s1`, phase "stage", with per-item scores) are journaled, then one search record
    per candidate whose metrics and fitness come from every item it scored."""
    fidelity = search.cfg.fidelity
    assert fidelity is not None
    weights = {t.name: t.weight for t in search.cfg.tasks}
    scores: dict[str, dict[str, dict[int, float]]] = {item.eval_id: {} for item in items}
    totals: dict[str, dict[str, int]] = {}
    stages: dict[str, list[dict[str, Any]]] = {item.eval_id: [] for item in items}
    estimates: dict[str, Estimate] = {}
    racing = [item for item in items if item.recipe is not None]
    windows = stage_windows(fidelity.stages)
    for number, window in enumerate(windows):
        stage_items = [
            replace(item, eval_id=f"{item.eval_id}/s{number}", phase="stage", window=window) for item in racing
        ]
        for item, record in zip(racing, search.evaluate(stage_items), strict=True):
            stages[item.eval_id].append(record)
            if record["status"] != "ok":
                estimates.pop(item.eval_id, None)
                continue
            if "items" not in record:
                raise EvomergeError(
                    f"worker.factory: {search.cfg.worker.factory} answered a staged evaluation "
                    "without per-item scores; fidelity needs a worker that scores windows"
                )
            merge_items(scores[item.eval_id], record["items"])
            totals[item.eval_id] = {t: int(record["metrics"].get(f"{t}/n_full", 0)) for t in weights}
            estimates[item.eval_id] = estimate(
                {t: list(v.values()) for t, v in scores[item.eval_id].items()}, totals[item.eval_id], weights
            )
        racing = [item for item in racing if stages[item.eval_id][-1]["status"] == "ok"]
        if number < len(windows) - 1:
            keep = still_racing(estimates, fidelity.z, fidelity.rank)  # the bar counts finished ones too
            racing = [item for item in racing if item.eval_id in keep]
    for item in items:
        if item.eval_id in search.records:
            continue
        if item.recipe is None:
            search.append_record(item, None, status="failed", reason=item.error)
        elif item.eval_id not in estimates:
            failed = stages[item.eval_id][-1]
            search.append_record(item, None, status="failed", reason=failed["reason"])
        else:
            _journal_staged(
                search, item, stages[item.eval_id], scores[item.eval_id], totals[item.eval_id], estimates[item.eval_id]
            )
    return [search.records[item.eval_id] for item in items]


def _journal_staged(
    search: Search,
    item: Item,
    stages: list[dict[str, Any]],
    scores: dict[str, dict[int, float]],
    totals: dict[str, int],
    est: Estimate,
) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    for task in search.cfg.tasks:
        values = list(scores.get(task.name, {}).values())
        metrics[f"{task.name}/{task.metric}"] = sum(values) / len(values) if values else 0.0
        metrics[f"{task.name}/n"] = float(len(values))
        metrics[f"{task.name}/n_full"] = float(totals.get(task.name, 0))
    fidelity = search.cfg.fidelity
    assert fidelity is not None
    result = EvalResult.success(item.eval_id, est.fitness, metrics)
    result.seconds = sum(r["seconds"] for r in stages)
    result.attempts = 0
    staged = {
        "stages": [r["eval_id"] for r in stages],
        "complete": est.complete,
        "se": est.se,
        "upper": est.upper(fidelity.z),
        "lower": est.lower(fidelity.z),
    }
    return search.append_record(item, None, result=result, counted=False, extra={"fidelity": staged})
