"""Staged (multi-fidelity) evaluation: race a generation's candidates on growing item prefixes.

Each task's search items (its seeded `limit` subset, or the whole split) are put in one fixed
seeded order; stage k scores positions [n_{k-1}, n_k) of that order, the last stage the rest, so
a candidate that finishes every stage has scored exactly the items a run without stages scores,
and no item is ever scored twice (each stage's per-item scores are journaled and reused).

After each stage a candidate's fitness is estimated from the items scored so far, with a
standard error (sampling without replacement from the N items: finite-population corrected, so
it is 0 once all N are scored). A candidate stays in the race while its upper bound
(estimate + z * se) reaches the `rank`-th best lower bound (estimate - z * se) of the
generation; the others are told their estimate. Everything is a function of journaled scores, so
a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def stage_windows(stages: Sequence[int]) -> list[tuple[int, int | None]]:
    """[(0, n_1), (n_1, n_2), ..., (n_last, None)]: positions each stage adds (None: to the end)."""
    bounds = [0, *stages]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)] + [(bounds[-1], None)]


@dataclass(frozen=True)
class Estimate:
    fitness: float
    se: float
    complete: bool  # every item of every task scored: the fitness is exact

    def upper(self, z: float) -> float:
        return self.fitness + z * self.se

    def lower(self, z: float) -> float:
        return self.fitness - z * self.se


def estimate(
    scores: Mapping[str, Sequence[float]], totals: Mapping[str, int], weights: Mapping[str, float]
) -> Estimate:
    """Weighted mean of per-task means; se = sqrt(sum w^2 se_t^2), tasks being independent.

    For scores in [0, 1] the per-item variance is bounded by p(1 - p), taken at the Agresti-Coull
    p = (sum + 1) / (n + 2) so that 0/n or n/n still has a non-zero bound; other metrics use the
    sample variance."""
    fitness, variance, complete = 0.0, 0.0, True
    for task, weight in weights.items():
        values = list(scores.get(task, ()))
        n, total = len(values), int(totals.get(task, len(values)))
        mean = sum(values) / n if n else 0.0
        fitness += weight * mean
        complete = complete and n >= total
        if n >= total or n == 0:
            continue
        if all(0.0 <= v <= 1.0 for v in values):
            p = (sum(values) + 1.0) / (n + 2.0)
            item_var = p * (1.0 - p)
        else:
            item_var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
        fpc = (total - n) / (total - 1) if total > 1 else 0.0
        variance += weight**2 * item_var / n * fpc
    return Estimate(fitness, math.sqrt(variance), complete)


def still_racing(estimates: Mapping[str, Estimate], z: float, rank: int) -> set[str]:
    """Candidates whose upper bound reaches the rank-th best lower bound (and are not yet exact)."""
    if not estimates:
        return set()
    lowers = sorted((e.lower(z) for e in estimates.values()), reverse=True)
    bar = lowers[min(rank, len(lowers)) - 1]
    return {key for key, e in estimates.items() if not e.complete and e.upper(z) >= bar}


def merge_items(into: dict[str, dict[int, float]], items: Mapping[str, Sequence[Sequence[Any]]]) -> None:
    """Add a stage's per-item scores ({task: [[index, score], ...]}) to a candidate's, by item index."""
    for task, pairs in items.items():
        bucket = into.setdefault(task, {})
        for index, score in pairs:
            bucket[int(index)] = float(score)


def items_scored(records: Iterable[Mapping[str, Any]]) -> int:
    """Items workers really scored in the search (stages included; cache hits and replays excluded):
    the forward-pass cost that staged evaluation saves."""
    total = 0
    for record in records:
        if (
            record["phase"] not in ("search", "stage")
            or record.get("fidelity")
            or record["status"] != "ok"
            or record.get("cached_from")
        ):
            continue
        total += int(sum(v for k, v in record["metrics"].items() if k.endswith("/n")))
    return total
