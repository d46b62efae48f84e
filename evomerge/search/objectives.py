"""Multi-objective runs: each evaluation's objective vector, and the Pareto front of a run.

Objectives are task metrics on the search split (read from the journaled metrics) or measures of
the decoded recipe, computed by the merge planner from safetensors headers (no weights):
`size` = parameters of the merged model, `path_length` = its layers (what a DFS path changes).

    runs/NAME/pareto.json   {"objectives": [{"name", "direction"}], "evaluated": N,
                             "front": [{"eval_id", "objectives": {name: value}, "fitness", "recipe"}]}

The front holds every non-dominated successful search evaluation (one per distinct recipe, the
earliest), recomputed from the journal, so it never depends on which optimizer ran or on resumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from evomerge.search.run import PARETO_FILE
from evomerge.search.space.config import ObjectiveSpec, SpaceConfig

__all__ = ["PARETO_FILE", "Objectives", "non_dominated", "objective_directions", "objective_name"]


def objective_name(spec: ObjectiveSpec, config: SpaceConfig) -> str:
    """`task/metric` (the journal's metric key, so `evomerge report` finds it) or the measure's name."""
    if spec.measure is not None:
        return spec.measure
    task = next(t for t in config.tasks if t.name == spec.task)
    return f"{task.name}/{spec.metric or task.metric}"


def objective_directions(config: SpaceConfig) -> list[str]:
    return [s.direction or ("maximize" if s.task is not None else "minimize") for s in config.objectives]


class Objectives:
    """The objective vector of a journal record; measures are computed once per recipe."""

    def __init__(self, config: SpaceConfig, catalog: Any):
        self.specs = list(config.objectives)
        self.names = [objective_name(s, config) for s in self.specs]
        self.directions = objective_directions(config)
        self.catalog = catalog
        self._measures: dict[str, dict[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def values(self, record: dict[str, Any]) -> dict[str, float] | None:
        """{name: value}, or None for a failed evaluation or a metric the worker did not report."""
        if record["status"] != "ok" or not record.get("recipe"):
            return None
        out: dict[str, float] = {}
        for spec, name in zip(self.specs, self.names, strict=True):
            if spec.measure is not None:
                out[name] = self._measure(record)[spec.measure]
            elif name in record["metrics"]:
                out[name] = float(record["metrics"][name])
            else:
                return None
        return out

    def vector(self, record: dict[str, Any]) -> list[float] | None:
        values = self.values(record)
        return None if values is None else [values[n] for n in self.names]

    def _measure(self, record: dict[str, Any]) -> dict[str, float]:
        key = record["recipe_sha"]
        if key not in self._measures:
            from evomerge.merge.plan import plan_merge
            from evomerge.merge.recipe import parse_recipe_text

            plan = plan_merge(parse_recipe_text(record["recipe"]), self.catalog)
            self._measures[key] = {"size": float(plan.parameters), "path_length": float(len(plan.layer_sources))}
        return self._measures[key]

    def document(self, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """pareto.json: the non-dominated search evaluations among `records`."""
        points: list[tuple[dict[str, Any], dict[str, float]]] = []
        seen: set[str] = set()
        for record in sorted(records, key=lambda r: r["eval_id"]):
            if record["phase"] != "search" or record["recipe_sha"] in seen:
                continue
            values = self.values(record)
            if values is not None:
                seen.add(record["recipe_sha"])
                points.append((record, values))
        signs = [1.0 if d == "maximize" else -1.0 for d in self.directions]
        vectors = [[s * values[n] for s, n in zip(signs, self.names, strict=True)] for _, values in points]
        front = [
            {
                "eval_id": record["eval_id"],
                "objectives": values,
                "fitness": record["fitness"],
                "recipe": record["recipe"],
            }
            for i, (record, values) in enumerate(points)
            if i in non_dominated(vectors)
        ]
        return {
            "objectives": [{"name": n, "direction": d} for n, d in zip(self.names, self.directions, strict=True)],
            "evaluated": len(points),
            "front": front,
        }


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good everywhere and better somewhere (every objective maximized)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def non_dominated(vectors: Sequence[Sequence[float]]) -> set[int]:
    """Indices of the vectors no other vector dominates (maximization)."""
    return {i for i, v in enumerate(vectors) if not any(dominates(w, v) for w in vectors)}
