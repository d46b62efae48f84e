"""What an executor moves around: candidates in, results out, and how to build a worker.

The executor treats a candidate as an opaque, picklable payload with an id; it never looks inside.
Results are keyed by candidate id so that the order in which workers finish cannot change what a
search sees (Local and Ray pools give the same results for the same candidates).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

Status = Literal["ok", "failed"]


@dataclass(frozen=True)
class Candidate:
    """One unit of work. `attempt` is set by the executor (1 on the first try) so that a worker
    can tell a retry from a first run; it is not part of the candidate's identity."""

    id: str
    payload: Any
    attempt: int = 1

    def with_attempt(self, attempt: int) -> Candidate:
        return replace(self, attempt=attempt)


@dataclass
class EvalResult:
    """The outcome of one candidate. `fitness` is what the optimizer maximizes; a failed candidate
    carries the executor's penalty fitness and a human-readable `reason`.

    `seconds` is the wall time inside the worker's `evaluate` (not queueing), `worker` the slot that
    produced the result, `attempts` how many workers it took (more than 1 after a worker died).
    `timings` is free-form telemetry from the worker (e.g. seconds in forward passes); `items` the
    per-item scores of each task's fitness metric when the payload asked for a window of items."""

    candidate_id: str
    status: Status
    fitness: float
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0
    worker: str = ""
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    items: dict[str, list[list[float]]] = field(default_factory=dict)  # task -> [[doc index, score], ...]

    @classmethod
    def success(
        cls,
        candidate_id: str,
        fitness: float,
        metrics: Mapping[str, float] | None = None,
        timings: Mapping[str, float] | None = None,
        items: Mapping[str, list[list[float]]] | None = None,
    ) -> EvalResult:
        return cls(
            candidate_id,
            "ok",
            float(fitness),
            dict(metrics or {}),
            None,
            timings=dict(timings or {}),
            items=dict(items or {}),
        )

    @classmethod
    def failure(cls, candidate_id: str, reason: str, metrics: Mapping[str, float] | None = None) -> EvalResult:
        """A failed evaluation; its fitness is replaced by the executor's penalty."""
        return cls(candidate_id, "failed", math.nan, dict(metrics or {}), reason)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def outcome(self) -> tuple[Any, ...]:
        """The part of a result that must not depend on which worker ran it, or when."""
        return (self.candidate_id, self.status, self.fitness, tuple(sorted(self.metrics.items())), self.reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        return cls(**dict(data))


@runtime_checkable
class Worker(Protocol):
    """Built once per executor slot (and again after the slot's process restarts); holds whatever
    is expensive to load (source models, lm-eval tasks) and scores one candidate at a time."""

    def evaluate(self, candidate: Candidate) -> EvalResult: ...


# Worker factories that moved: search spaces and run directories written before a move name the
# old path (`worker.factory`), and still run.
FACTORY_ALIASES = {"evomerge.evaluation.fitness:FitnessWorker": "evomerge.workers.fitness:FitnessWorker"}


@dataclass(frozen=True)
class WorkerSpec:
    """A picklable recipe for building a worker on a slot: `factory(**kwargs)`.

    `factory` is a callable importable on the workers (a class or a module-level function), or its
    dotted name `"package.module:attr"`, which keeps the spec plain data for config snapshots."""

    factory: Callable[..., Worker] | str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def resolve_factory(self) -> Callable[..., Worker]:
        if callable(self.factory):
            return self.factory
        module_name, sep, attr = FACTORY_ALIASES.get(self.factory, self.factory).partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"worker factory {self.factory!r}: expected 'package.module:attr'")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        return target

    def build(self) -> Worker:
        return self.resolve_factory()(**dict(self.kwargs))
