"""The contract and bookkeeping shared by the evaluation pools (see executors.py).

Every pool builds its workers from a `WorkerSpec`, accepts candidates with `submit`, and hands
back results with `as_completed` in the order they finish (or `map_unordered` / `evaluate_all`).
The contract:

* every submitted candidate gets exactly one `EvalResult`; a candidate's own failure (exception,
  out-of-memory, timeout, non-finite fitness or metric) is a failed result with the penalty fitness
  and a reason, never an exception out of the pool;
* a candidate whose worker process dies is re-queued on another worker, up to `max_attempts` tries,
  then recorded as failed; the dead slot restarts (Ray re-runs the factory) and rejoins the pool;
* the pool adds no randomness, so the same candidates give the same outcomes on either executor.

Only a pool with no live worker left raises (`NoLiveWorkersError`); what is still pending then was
never evaluated and must not be journaled as a failure.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from evomerge.errors import EvomergeError
from evomerge.workers.candidate import Candidate, EvalResult

DEFAULT_PENALTY = 0.0
DEFAULT_MAX_ATTEMPTS = 3


class NoLiveWorkersError(EvomergeError):
    """Every slot of the pool is gone (its factory failed, or it died more often than allowed)."""


@dataclass
class WorkerStats:
    """Telemetry for one slot, summed over its restarts.

    `busy_seconds` is time inside `evaluate`; `alive_seconds` is time the slot was ready to take
    work (measured by the driver). Their difference is what the pool wasted on that slot."""

    worker: str
    evaluations: int = 0
    failures: int = 0
    deaths: int = 0
    busy_seconds: float = 0.0
    alive_seconds: float = 0.0
    setup_seconds: float = 0.0
    pid: int | None = None
    retired: bool = False

    @property
    def idle_seconds(self) -> float:
        return max(0.0, self.alive_seconds - self.busy_seconds)

    @property
    def utilization(self) -> float:
        return self.busy_seconds / self.alive_seconds if self.alive_seconds > 0 else 0.0


def _non_finite_field(result: EvalResult) -> str | None:
    """Name the first value of an ok result that a search cannot use, or None."""
    if not isinstance(result.fitness, (int, float)) or not math.isfinite(result.fitness):
        return f"fitness is {result.fitness!r}"
    for name, value in result.metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {name!r} is {value!r}"
    return None


@dataclass
class _Ledger:
    """Queue and bookkeeping shared by the executors: what is pending, retries, penalty, stats."""

    penalty: float
    max_attempts: int
    pending: deque[Candidate] = field(default_factory=deque)
    open_ids: set[str] = field(default_factory=set)
    died_on: dict[str, set[str]] = field(default_factory=dict)
    stats: dict[str, WorkerStats] = field(default_factory=dict)

    def add(self, candidates: Iterable[Candidate]) -> None:
        batch = list(candidates)
        for cand in batch:
            if not isinstance(cand, Candidate):
                raise TypeError(f"expected Candidate, got {type(cand).__name__}")
            if cand.id in self.open_ids:
                raise ValueError(f"candidate {cand.id!r} is already pending or running")
        ids = [c.id for c in batch]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate candidate ids in one submit")
        for cand in batch:
            self.open_ids.add(cand.id)
            self.pending.append(cand.with_attempt(1))

    def take(self, worker: str) -> Candidate | None:
        """The next pending candidate, preferring one that has not already killed `worker`."""
        for index, cand in enumerate(self.pending):
            if worker not in self.died_on.get(cand.id, ()):
                del self.pending[index]
                return cand
        return self.pending.popleft() if self.pending else None

    def finish(self, raw: EvalResult, cand: Candidate, worker: str) -> EvalResult:
        """Validate a worker's result, apply the penalty to failures, record telemetry."""
        result = raw
        if result.candidate_id != cand.id:
            result = EvalResult.failure(cand.id, f"worker answered for candidate {raw.candidate_id!r}")
            result.seconds = raw.seconds
        elif result.ok and (problem := _non_finite_field(result)) is not None:
            result = EvalResult.failure(cand.id, f"invalid result: {problem}", metrics={})
            result.seconds = raw.seconds
        if not result.ok:
            result.fitness = self.penalty
        else:
            result.fitness = float(result.fitness)
        result.worker = worker
        result.attempts = cand.attempt
        stats = self.stats[worker]
        stats.evaluations += 1
        stats.failures += 0 if result.ok else 1
        stats.busy_seconds += result.seconds
        self.close_id(cand.id)
        return result

    def worker_died(self, cand: Candidate, worker: str, reason: str, elapsed: float) -> EvalResult | None:
        """Re-queue a candidate whose worker died under it, or fail it once it used its attempts."""
        self.died_on.setdefault(cand.id, set()).add(worker)
        if cand.attempt < self.max_attempts:
            self.pending.appendleft(cand.with_attempt(cand.attempt + 1))
            return None
        result = EvalResult.failure(cand.id, f"worker died on each of {cand.attempt} attempts; last: {reason}")
        result.fitness = self.penalty
        result.seconds = elapsed
        result.worker = worker
        result.attempts = cand.attempt
        self.close_id(cand.id)
        return result

    def close_id(self, candidate_id: str) -> None:
        self.open_ids.discard(candidate_id)
        self.died_on.pop(candidate_id, None)


class Executor:
    """The interface both pools share. Subclasses implement `as_completed` and `close`."""

    def __init__(self, penalty: float, max_attempts: int, timeout: float | None):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.timeout = timeout
        self._ledger = _Ledger(penalty=float(penalty), max_attempts=max_attempts)

    @property
    def penalty(self) -> float:
        return self._ledger.penalty

    @property
    def n_workers(self) -> int:
        return len(self._ledger.stats)

    def submit(self, candidates: Iterable[Candidate]) -> None:
        """Queue candidates; may be called again while `as_completed` is being iterated."""
        self._ledger.add(candidates)

    def as_completed(self) -> Iterator[EvalResult]:
        """Yield one result per submitted candidate as each finishes, until none is left."""
        raise NotImplementedError

    def map_unordered(self, candidates: Iterable[Candidate]) -> Iterator[EvalResult]:
        self.submit(candidates)
        yield from self.as_completed()

    def evaluate_all(self, candidates: Sequence[Candidate]) -> list[EvalResult]:
        """Evaluate a batch and return results in the batch's order."""
        by_id = {r.candidate_id: r for r in self.map_unordered(candidates)}
        return [by_id[c.id] for c in candidates]

    @property
    def outstanding(self) -> int:
        """Candidates submitted whose result has not been yielded yet."""
        return len(self._ledger.open_ids)

    def stats(self) -> dict[str, WorkerStats]:
        """A snapshot of per-worker telemetry (busy, alive, idle time; evaluations; deaths)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
