"""Evaluation pools with one interface: `LocalExecutor` (in process) and `RayExecutor` (Ray actors).

    with RayExecutor(WorkerSpec(MyWorker, {"sources": paths}), ray_address="auto") as pool:
        pool.submit(candidates)
        for result in pool.as_completed():   # in finishing order; result.candidate_id says which
            journal(result)

The Ray pool dispatches asynchronously: each actor holds at most `in_flight_per_worker` calls, and
a slot that finishes gets the next pending candidate at once, so no worker waits for a batch's
slowest candidate. A dead actor is restarted by Ray (re-running the worker factory, which reloads
the sources) and its in-flight candidates are re-queued. See pool.py for the full contract.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from evomerge.workers.candidate import Candidate, EvalResult, WorkerSpec
from evomerge.workers.pool import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PENALTY,
    Executor,
    NoLiveWorkersError,
    WorkerStats,
)
from evomerge.workers.ray_cluster import QUIET_WORKER_ENV, init_ray, plan_pool
from evomerge.workers.worker_host import SlotInfo, WorkerHost, describe_exception

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PENALTY",
    "Candidate",
    "EvalResult",
    "Executor",
    "LocalExecutor",
    "NoLiveWorkersError",
    "RayExecutor",
    "WorkerSpec",
    "WorkerStats",
]


class LocalExecutor(Executor):
    """Runs workers in this process, one candidate at a time. For tests and single-process use.

    `n_workers` > 1 builds several workers and rotates between them (a check that a worker's
    results do not depend on what it evaluated before). A crash of this process cannot be
    survived here; that is what the Ray executor is for. Candidates are evaluated lazily, while
    `as_completed` is iterated."""

    def __init__(
        self,
        spec: WorkerSpec,
        n_workers: int = 1,
        penalty: float = DEFAULT_PENALTY,
        timeout: float | None = None,
        torch_threads: int | None = None,
    ):
        super().__init__(penalty, max_attempts=1, timeout=timeout)
        if n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}")
        self._hosts: list[WorkerHost] = []
        self._ready_at: dict[str, float] = {}
        for index in range(n_workers):
            host = WorkerHost(spec, f"local-{index}", torch_threads=torch_threads)
            info = host.info()
            self._hosts.append(host)
            self._ready_at[host.worker_id] = time.perf_counter()
            self._ledger.stats[host.worker_id] = WorkerStats(
                host.worker_id, setup_seconds=info.setup_seconds, pid=info.pid
            )
        self._turn = 0
        self._closed_at: float | None = None

    def as_completed(self) -> Iterator[EvalResult]:
        while self._ledger.pending and self._closed_at is None:
            host = self._hosts[self._turn % len(self._hosts)]
            self._turn += 1
            cand = self._ledger.take(host.worker_id)
            if cand is None:
                break
            raw = host.evaluate(cand, self.timeout)
            yield self._ledger.finish(raw, cand, host.worker_id)

    def stats(self) -> dict[str, WorkerStats]:
        end = self._closed_at if self._closed_at is not None else time.perf_counter()
        snapshot = {}
        for name, stats in self._ledger.stats.items():
            copy = WorkerStats(**vars(stats))
            copy.alive_seconds = end - self._ready_at[name]
            snapshot[name] = copy
        return snapshot

    def close(self) -> None:
        if self._closed_at is None:
            self._closed_at = time.perf_counter()
            self._hosts.clear()


@dataclass
class _Call:
    """One `evaluate` call in flight on an actor. `started` is when it reached the head of the
    actor's queue (calls on one actor run in submission order), which is when its clock starts."""

    ref: Any
    candidate: Candidate
    started: float | None


@dataclass
class _Slot:
    name: str
    actor: Any
    state: str = "starting"  # starting -> ready -> (dies) starting ... -> retired
    probe: Any = None
    starting_since: float = 0.0
    next_probe_at: float = 0.0
    probe_failures: int = 0
    ready_since: float | None = None
    calls: deque[_Call] = field(default_factory=deque)
    last_error: str = ""


# A restarting actor refuses calls (ActorUnavailableError) until its new process is up, so the
# readiness probe is re-sent after a pause. A probe that finds the actor dead may have reached the
# old process just before it was killed; only after this many in a row is the slot given up.
MAX_PROBE_FAILURES = 3
PROBE_RETRY_S = 0.5
GET_TIMEOUT_S = 60.0


def _actor_failure_reason(exc: BaseException) -> str:
    """Ray's actor-death messages run over many lines; keep the headline and the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("\t")]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


class RayExecutor(Executor):
    """A pool of Ray actors, each hosting one worker; survives actor deaths.

    `ray_address`: `auto` joins a running cluster, None / `local` starts a private instance (see
    `init_ray`); if Ray is already initialized it is used as is. The pool starts one actor per GPU
    when the cluster has GPUs, else one per CPU, unless `n_workers` says otherwise (`plan_pool`).
    Actors run with progress bars off (`QUIET_WORKER_ENV`): Ray forwards their output to the driver.

    `timeout` (seconds per candidate) is enforced twice: inside the actor it interrupts the
    candidate's Python code (a failed result, the actor lives on); if the call still has not
    returned `timeout_grace` seconds later, the actor is killed and restarted and the candidate
    is recorded as timed out (not retried: it is the candidate's fault).

    `max_restarts` bounds how often each slot may die; after that it is retired. Each candidate
    gets at most `max_attempts` workers dying under it before it is recorded as failed."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        n_workers: int | None = None,
        ray_address: str | None = None,
        ray_temp_dir: str | None = None,
        penalty: float = DEFAULT_PENALTY,
        timeout: float | None = None,
        timeout_grace: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_restarts: int = 4,
        in_flight_per_worker: int = 1,
        cpus_per_worker: float = 0.5,
        gpus_per_worker: float = 1.0,
        start_timeout: float = 600.0,
        poll_seconds: float = 0.2,
    ):
        super().__init__(penalty, max_attempts=max_attempts, timeout=timeout)
        import ray

        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self._ray = ray
        self._owns_ray = init_ray(ray_address, temp_dir=ray_temp_dir)
        self.in_flight_per_worker = in_flight_per_worker
        self._max_restarts = max_restarts
        self._grace = timeout_grace if timeout_grace is not None else max(2.0, 0.25 * (timeout or 0.0))
        self._start_timeout = start_timeout
        self._poll = poll_seconds
        self._finished: deque[EvalResult] = deque()
        self._refs: dict[Any, tuple[_Slot, _Call | None]] = {}
        self._closed = False
        self._info: dict[str, SlotInfo] = {}

        try:
            self.plan = plan_pool(ray.cluster_resources(), n_workers, cpus_per_worker, gpus_per_worker)
        except ValueError:  # the count does not fit: leave no private instance behind
            if self._owns_ray:
                ray.shutdown()
            raise
        actor_class = ray.remote(WorkerHost)
        self._slots: list[_Slot] = []
        for index in range(self.plan.n_workers):
            name = f"ray-{index}"
            actor = actor_class.options(
                max_restarts=max_restarts,
                max_task_retries=0,
                runtime_env={"env_vars": QUIET_WORKER_ENV},
                # one worker per node before two on one: each holds a copy of the sources, so
                # spreading shares the memory, and a lost node takes the fewest workers with it
                scheduling_strategy="SPREAD",
                **self.plan.actor_options(),
            ).remote(spec, name, self.plan.torch_threads)
            slot = _Slot(name, actor)
            self._slots.append(slot)
            self._ledger.stats[name] = WorkerStats(name)
            self._start_watch(slot)

    # ---- public extras -------------------------------------------------------------------------

    @property
    def in_flight_per_worker(self) -> int:
        """Calls queued on each actor: 1 = strict one-at-a-time, 2 = the next candidate is already
        waiting in the actor when the current one ends (hides the driver round trip)."""
        return self._depth

    @in_flight_per_worker.setter
    def in_flight_per_worker(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"in_flight_per_worker must be at least 1, got {depth}")
        self._depth = depth

    def submit(self, candidates: Iterable[Candidate]) -> None:
        """Queue candidates and start them on idle slots right away."""
        super().submit(candidates)
        self._dispatch()

    def wait_ready(self, timeout: float = 600.0) -> int:
        """Block until every live slot has built its worker (or `timeout`); return how many are ready.

        Optional: `as_completed` dispatches to slots as they become ready. Useful to keep startup
        (loading sources) out of throughput measurements."""
        deadline = time.monotonic() + timeout
        while any(s.state == "starting" for s in self._slots):
            self._require_live_slot()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            probes = [s.probe for s in self._slots if s.state == "starting" and s.probe is not None]
            self._wait_and_collect(probes, min(remaining, self._poll))
        self._require_live_slot()
        return sum(s.state == "ready" for s in self._slots)

    def in_flight(self) -> dict[str, list[str]]:
        """Candidate ids on each slot, running one first."""
        return {s.name: [c.candidate.id for c in s.calls] for s in self._slots}

    def actor(self, worker: str) -> Any:
        """The Ray actor handle of a slot (for fault-injection tests and diagnostics)."""
        return next(s.actor for s in self._slots if s.name == worker)

    def slot_info(self, worker: str) -> SlotInfo | None:
        return self._info.get(worker)

    # ---- the loop ------------------------------------------------------------------------------

    def as_completed(self) -> Iterator[EvalResult]:
        while self._ledger.open_ids or self._finished:
            self._dispatch()
            while self._finished:
                yield self._finished.popleft()
            if not self._ledger.open_ids:
                break
            self._require_live_slot()
            self._wait_and_collect(list(self._refs), self._poll)

    def _wait_and_collect(self, refs: list[Any], timeout: float) -> None:
        """Handle every call that finished within `timeout`, then the clocks (deadlines, probes)."""
        if refs:
            done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
            if done:
                done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                self._collect(ref)
        else:
            time.sleep(timeout)
        self._tick()

    def _dispatch(self) -> None:
        """Fill every ready slot up to the in-flight depth, one call per slot per round."""
        now = time.monotonic()
        for depth in range(1, self._depth + 1):
            for slot in self._slots:
                if not self._ledger.pending:
                    return
                if slot.state != "ready" or len(slot.calls) >= depth:
                    continue
                cand = self._ledger.take(slot.name)
                if cand is None:
                    return
                ref = slot.actor.evaluate.remote(cand, self.timeout)
                call = _Call(ref, cand, started=None if slot.calls else now)
                slot.calls.append(call)
                self._refs[ref] = (slot, call)

    def _collect(self, ref: Any) -> None:
        from ray.exceptions import RayError, RayTaskError

        entry = self._refs.pop(ref, None)
        if entry is None:
            return
        slot, call = entry
        try:
            value = self._ray.get(ref, timeout=GET_TIMEOUT_S)
        except RayTaskError as exc:
            if call is None:
                self._probe_failed(slot, exc)
            else:  # the host itself failed (e.g. an unpicklable result): the candidate's problem
                self._complete(
                    slot,
                    call,
                    EvalResult.failure(
                        call.candidate.id, f"evaluation failed in the worker host: {describe_exception(exc)}"
                    ),
                )
            return
        except RayError as exc:
            if call is None:
                self._probe_failed(slot, exc)
            else:
                self._slot_died(slot, _actor_failure_reason(exc))
            return
        if call is None:
            self._slot_ready(slot, value)
        else:
            self._complete(slot, call, value)

    def _complete(self, slot: _Slot, call: _Call, raw: EvalResult) -> None:
        slot.calls.remove(call)
        if slot.calls and slot.calls[0].started is None:
            slot.calls[0].started = time.monotonic()
        self._finished.append(self._ledger.finish(raw, call.candidate, slot.name))

    # ---- slot life cycle -----------------------------------------------------------------------

    def _start_watch(self, slot: _Slot) -> None:
        """The slot's actor is (re)starting: take no work until a readiness probe answers."""
        slot.state = "starting"
        slot.starting_since = time.monotonic()
        slot.probe_failures = 0
        self._probe(slot)

    def _probe(self, slot: _Slot) -> None:
        slot.probe = slot.actor.info.remote()
        self._refs[slot.probe] = (slot, None)

    def _slot_ready(self, slot: _Slot, info: SlotInfo) -> None:
        slot.state = "ready"
        slot.probe = None
        slot.probe_failures = 0
        slot.ready_since = time.monotonic()
        self._info[slot.name] = info
        stats = self._ledger.stats[slot.name]
        stats.setup_seconds = info.setup_seconds
        stats.pid = info.pid

    def _probe_failed(self, slot: _Slot, exc: BaseException) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        slot.probe = None
        slot.last_error = _actor_failure_reason(exc)
        if isinstance(exc, RayActorError) and exc.actor_init_failed:
            self._retire(slot, f"worker factory failed: {slot.last_error}")
            return
        if not isinstance(exc, ActorUnavailableError):
            slot.probe_failures += 1
            if slot.probe_failures > MAX_PROBE_FAILURES:
                self._retire(slot, slot.last_error)
                return
        slot.next_probe_at = time.monotonic() + PROBE_RETRY_S

    def _leave_ready(self, slot: _Slot) -> None:
        if slot.ready_since is not None:
            self._ledger.stats[slot.name].alive_seconds += time.monotonic() - slot.ready_since
            slot.ready_since = None

    def _slot_died(self, slot: _Slot, reason: str, timed_out: _Call | None = None) -> None:
        """The actor's process is gone: requeue its calls (the running one costs an attempt, the
        queued ones do not), then restart the slot or retire it."""
        now = time.monotonic()
        self._leave_ready(slot)
        stats = self._ledger.stats[slot.name]
        stats.deaths += 1
        slot.last_error = reason
        calls = list(slot.calls)
        slot.calls.clear()
        for call in calls:
            self._refs.pop(call.ref, None)
        if slot.probe is not None:
            self._refs.pop(slot.probe, None)
            slot.probe = None
        for call in reversed(calls[1:]):
            self._ledger.pending.appendleft(call.candidate)
        if calls:
            head = calls[0]
            elapsed = now - head.started if head.started is not None else 0.0
            if head is timed_out:
                failed = EvalResult.failure(head.candidate.id, reason)
                failed.seconds = elapsed
                self._finished.append(self._ledger.finish(failed, head.candidate, slot.name))
            else:
                result = self._ledger.worker_died(head.candidate, slot.name, reason, elapsed)
                if result is not None:
                    self._finished.append(result)
        if stats.deaths > self._max_restarts:
            self._retire(slot, f"died {stats.deaths} times; last: {reason}")
        else:
            self._start_watch(slot)

    def _retire(self, slot: _Slot, reason: str) -> None:
        self._leave_ready(slot)
        slot.state = "retired"
        slot.last_error = reason
        self._ledger.stats[slot.name].retired = True
        for call in slot.calls:  # only reachable when retiring a slot that still had work
            self._refs.pop(call.ref, None)
            self._ledger.pending.appendleft(call.candidate)
        slot.calls.clear()
        self._ray.kill(slot.actor, no_restart=True)

    def _tick(self) -> None:
        """Re-send due readiness probes; kill actors that overran a start or candidate deadline."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.state == "starting" and now - slot.starting_since > self._start_timeout:
                self._ray.kill(slot.actor, no_restart=False)
                self._slot_died(slot, f"worker did not start within {self._start_timeout:g} s")
            elif slot.state == "starting" and slot.probe is None and now >= slot.next_probe_at:
                self._probe(slot)
            elif self.timeout is not None and slot.state == "ready" and slot.calls:
                head = slot.calls[0]
                if head.started is not None and now - head.started > self.timeout + self._grace:
                    self._ray.kill(slot.actor, no_restart=False)
                    reason = f"timeout: evaluation exceeded {self.timeout:g} s; worker killed"
                    self._slot_died(slot, reason, timed_out=head)

    def _require_live_slot(self) -> None:
        if all(s.state == "retired" for s in self._slots):
            reasons = "; ".join(f"{s.name}: {s.last_error}" for s in self._slots)
            raise NoLiveWorkersError(f"no live evaluation workers left ({reasons})")

    # ---- telemetry and shutdown ----------------------------------------------------------------

    def stats(self) -> dict[str, WorkerStats]:
        now = time.monotonic()
        snapshot = {}
        for slot in self._slots:
            copy = WorkerStats(**vars(self._ledger.stats[slot.name]))
            if slot.ready_since is not None:
                copy.alive_seconds += now - slot.ready_since
            snapshot[slot.name] = copy
        return snapshot

    def close(self) -> None:
        """Kill the actors (no restart); shut Ray down only if this executor started it."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            self._leave_ready(slot)
            if slot.state != "retired":
                self._ray.kill(slot.actor, no_restart=True)
        self._refs.clear()
        if self._owns_ray:
            self._ray.shutdown()
