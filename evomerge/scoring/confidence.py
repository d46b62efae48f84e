"""End-of-run statistics: the weighted score's 95% confidence interval from per-task metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Z95 = 1.959963984540054


def task_stderr(metrics: Mapping[str, float], task: str, metric: str) -> float | None:
    """The worker's stderr for a task metric, else the binomial one for a [0, 1] mean over n items."""
    reported = metrics.get(f"{task}/{metric}_stderr")
    if reported is not None and math.isfinite(reported):
        return float(reported)
    value, n = metrics.get(f"{task}/{metric}"), metrics.get(f"{task}/n")
    if value is None or not n or not 0.0 <= value <= 1.0:
        return None
    return math.sqrt(value * (1.0 - value) / n)


def weighted_ci95(score: float, metrics: Mapping[str, float], tasks: Sequence[Any]) -> list[float] | None:
    """score +- 1.96 * sqrt(sum_t w_t^2 se_t^2): tasks are scored on disjoint items, so independent."""
    variance = 0.0
    for task in tasks:
        se = task_stderr(metrics, task.name, task.metric)
        if se is None:
            return None
        variance += (task.weight * se) ** 2
    half = Z95 * math.sqrt(variance)
    return [score - half, score + half]
