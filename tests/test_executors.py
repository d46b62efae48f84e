"""Evaluation pools: the in-process pool, and the Ray pool on a real local Ray instance (2 CPUs).

The worker is `ProbeWorker`: a tiny random Llama built once per slot, scoring token sequences, with
payload switches that make a candidate raise, return NaN, overrun its time or crash its process.
Ray starts once per session; the Ray tests share one 2-actor pool and each begins by waiting until
both actors are alive again, so they do not depend on each other's order.
"""

from __future__ import annotations

import faulthandler
import math
import time
from collections.abc import Iterator

import pytest

from evomerge.workers.candidate import Candidate, EvalResult, WorkerSpec
from evomerge.workers.executors import LocalExecutor, NoLiveWorkersError, RayExecutor
from evomerge.workers.pool import _Ledger
from evomerge.workers.probe_worker import ProbeWorker
from evomerge.workers.ray_cluster import init_ray, plan_pool

PENALTY = -100.0
SPEC = WorkerSpec(ProbeWorker, {"seed": 3})
TIMEOUT = 2.0
GRACE = 1.0


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A hung Ray call must fail the run with a traceback, not stall it."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def plain(n: int, prefix: str = "c") -> list[Candidate]:
    return [Candidate(f"{prefix}{i}", {"seed": i, "length": 12}) for i in range(n)]


def collect(results: Iterator[EvalResult], expected: int, within: float = 60.0) -> dict[str, EvalResult]:
    started = time.monotonic()
    by_id: dict[str, EvalResult] = {}
    for result in results:
        assert result.candidate_id not in by_id, "a candidate got two results"
        by_id[result.candidate_id] = result
        assert time.monotonic() - started < within
    assert len(by_id) == expected
    return by_id


@pytest.fixture(scope="module")
def local_pool() -> Iterator[LocalExecutor]:
    with LocalExecutor(SPEC, penalty=PENALTY, timeout=TIMEOUT) as pool:
        yield pool


def local_outcomes(pool: LocalExecutor, candidates: list[Candidate]) -> dict[str, tuple]:
    """The in-process pool's outcomes for the same candidates (sleeps dropped: they change no score)."""
    undelayed = [Candidate(c.id, {k: v for k, v in c.payload.items() if k != "sleep"}) for c in candidates]
    return {r.candidate_id: r.outcome() for r in pool.map_unordered(undelayed)}


# ---- in-process pool and shared bookkeeping -----------------------------------------------------


def test_local_pool_scores_and_penalizes_without_raising(local_pool: LocalExecutor) -> None:
    batch = plain(3) + [
        Candidate("raises", {"seed": 1, "raise": "boom"}),
        Candidate("nan", {"seed": 2, "nan": True}),
        Candidate("overruns", {"seed": 3, "spin": 30}),
    ]
    results = local_pool.evaluate_all(batch)
    assert [r.candidate_id for r in results] == [c.id for c in batch]
    by_id = {r.candidate_id: r for r in results}
    for cand in plain(3):
        ok = by_id[cand.id]
        assert ok.ok and math.isfinite(ok.fitness) and ok.fitness == ok.metrics["logprob"]
        assert ok.worker == "local-0" and ok.attempts == 1 and ok.seconds > 0
    assert len({by_id[c.id].fitness for c in plain(3)}) == 3, "different payloads, different scores"
    raised, nan, overran = by_id["raises"], by_id["nan"], by_id["overruns"]
    assert (raised.status, raised.fitness, raised.reason) == ("failed", PENALTY, "evaluation raised RuntimeError: boom")
    assert (nan.status, nan.fitness, nan.reason) == ("failed", PENALTY, "invalid result: fitness is nan")
    assert overran.status == "failed" and overran.fitness == PENALTY and overran.reason.startswith("timeout")
    assert TIMEOUT <= overran.seconds < TIMEOUT + 1.0
    stats = local_pool.stats()["local-0"]
    assert stats.evaluations >= 6 and stats.failures >= 3
    assert stats.busy_seconds >= TIMEOUT and stats.alive_seconds >= stats.busy_seconds


def test_local_results_do_not_depend_on_order_or_worker() -> None:
    batch = plain(5)
    with LocalExecutor(SPEC, n_workers=2) as pool:
        forward = {r.candidate_id: r.outcome() for r in pool.map_unordered(batch)}
        backward = {r.candidate_id: r.outcome() for r in pool.map_unordered(batch[::-1])}
        assert {r.worker for r in pool.map_unordered(plain(2, "w"))} == {"local-0", "local-1"}
    assert forward == backward


def test_duplicate_or_bad_submissions_are_rejected(local_pool: LocalExecutor) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        local_pool.submit([Candidate("x", {}), Candidate("x", {})])
    local_pool.submit([Candidate("y", {"seed": 0})])
    with pytest.raises(ValueError, match="already pending"):
        local_pool.submit([Candidate("y", {"seed": 0})])
    with pytest.raises(TypeError):
        local_pool.submit([("z", {})])  # type: ignore[list-item]
    assert [r.candidate_id for r in local_pool.as_completed()] == ["y"]
    assert local_pool.outstanding == 0


def test_ledger_requeues_a_dead_workers_candidate_then_gives_up() -> None:
    ledger = _Ledger(penalty=PENALTY, max_attempts=2)
    ledger.add([Candidate("a", 1), Candidate("b", 2)])
    first = ledger.take("w0")
    assert first is not None and first.id == "a"
    assert ledger.worker_died(first, "w0", "actor died", 0.5) is None
    assert ledger.take("w0").id == "b", "w0 killed 'a' once, so it prefers another candidate"
    retry = ledger.take("w0")
    assert (retry.id, retry.attempt) == ("a", 2), "with nothing else left, 'a' may go anywhere"
    final = ledger.worker_died(retry, "w0", "actor died again", 0.5)
    assert final is not None and final.status == "failed" and final.fitness == PENALTY
    assert final.attempts == 2 and "actor died again" in final.reason
    assert "a" not in ledger.open_ids


def test_results_round_trip_through_plain_dicts() -> None:
    result = EvalResult.success("c", -1.5, {"acc": 0.5}, timings={"forward": 0.1})
    result.worker, result.attempts, result.seconds = "ray-1", 2, 0.25
    assert EvalResult.from_dict(result.to_dict()) == result


def test_worker_spec_accepts_a_dotted_factory_name() -> None:
    spec = WorkerSpec("evomerge.workers.probe_worker:ProbeWorker", {"seed": 3})
    assert spec.resolve_factory() is ProbeWorker
    with pytest.raises(ValueError, match="package.module:attr"):
        WorkerSpec("no_colon_here").resolve_factory()


def test_the_default_worker_keeps_its_old_import_path() -> None:
    """Search spaces and run directories written before the package split name the old path."""
    from evomerge.search.space.config import DEFAULT_WORKER
    from evomerge.workers.fitness import FitnessWorker

    assert DEFAULT_WORKER == "evomerge.workers.fitness:FitnessWorker"
    assert WorkerSpec("evomerge.evaluation.fitness:FitnessWorker").resolve_factory() is FitnessWorker


def test_pool_plan_is_one_actor_per_gpu_else_per_cpu() -> None:
    gpu = plan_pool({"CPU": 64.0, "GPU": 8.0})
    assert (gpu.n_workers, gpu.num_gpus, gpu.torch_threads) == (8, 1.0, None)
    assert gpu.actor_options() == {"num_cpus": 0.5, "num_gpus": 1.0}
    cpu = plan_pool({"CPU": 2.0})
    assert (cpu.n_workers, cpu.num_gpus, cpu.torch_threads) == (2, 0.0, 1)
    assert cpu.actor_options() == {"num_cpus": 0.5}, "fractional, so plain tasks are never starved"
    assert plan_pool({"CPU": 2.0}, n_workers=3).n_workers == 3
    with pytest.raises(ValueError, match="3 workers need 3 GPUs"):
        plan_pool({"CPU": 64.0, "GPU": 2.0}, n_workers=3)
    with pytest.raises(ValueError):
        plan_pool({"CPU": 2.0}, n_workers=0)


def test_init_ray_refuses_a_temp_dir_too_long_for_sockets(tmp_path) -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already running in this session")
    with pytest.raises(ValueError, match="too long"):
        init_ray("local", temp_dir=tmp_path / ("x" * 80))


# ---- Ray pool on a real local instance ----------------------------------------------------------


# `ray_instance` (one real local Ray instance with 2 CPUs per session) lives in conftest.py.


@pytest.fixture(scope="module")
def ray_pool(ray_instance: None) -> Iterator[RayExecutor]:
    pool = RayExecutor(
        SPEC,
        n_workers=2,
        penalty=PENALTY,
        timeout=TIMEOUT,
        timeout_grace=GRACE,
        max_attempts=2,
        max_restarts=10,
        start_timeout=60.0,
    )
    yield pool
    pool.close()


@pytest.fixture()
def pool(ray_pool: RayExecutor) -> RayExecutor:
    """The shared pool with both actors alive (an earlier test may have left one restarting)."""
    assert ray_pool.wait_ready(timeout=60.0) == 2
    assert ray_pool.outstanding == 0
    return ray_pool


def test_two_actors_match_the_local_pool_and_penalize(pool: RayExecutor, local_pool: LocalExecutor) -> None:
    batch = plain(8) + [
        Candidate("raises", {"seed": 1, "raise": "boom"}),
        Candidate("nan", {"seed": 2, "nan": True}),
    ]
    results = collect(pool.map_unordered(batch), len(batch))
    assert {r.worker for r in results.values()} == {"ray-0", "ray-1"}
    assert {cid: r.outcome() for cid, r in results.items()} == local_outcomes(local_pool, batch)
    assert results["raises"].fitness == PENALTY and results["raises"].reason.endswith("boom")
    assert results["nan"].fitness == PENALTY and "nan" in results["nan"].reason
    assert all(results[c.id].ok for c in plain(8))


def test_a_free_worker_takes_the_next_candidate_without_waiting_for_a_slow_one(pool: RayExecutor) -> None:
    slow = Candidate("slow", {"seed": 0, "sleep": 1.5})
    quick = plain(6, "q")
    pool.submit([slow, *quick])
    order = [r.candidate_id for r in pool.as_completed()]
    assert order[-1] == "slow" and sorted(order[:-1]) == sorted(c.id for c in quick)


def test_pipelined_calls_start_their_clock_when_they_reach_the_head(
    pool: RayExecutor, local_pool: LocalExecutor
) -> None:
    # Two sleepers queued on each actor: the second one finishes 3.6 s after dispatch, past the
    # hard deadline (TIMEOUT + GRACE = 3 s) if its clock started at dispatch instead of at its turn.
    sleepers = [Candidate(f"s{i}", {"seed": i, "sleep": 1.8}) for i in range(4)]
    batch = sleepers + plain(4, "d")
    pool.in_flight_per_worker = 2
    try:
        pool.submit(batch)
        assert sorted(len(ids) for ids in pool.in_flight().values()) == [2, 2]
        results = collect(pool.as_completed(), len(batch))
    finally:
        pool.in_flight_per_worker = 1
    assert {cid: r.outcome() for cid, r in results.items()} == local_outcomes(local_pool, batch)
    assert all(r.attempts == 1 for r in results.values())


def test_actor_killed_mid_evaluation_is_retried_elsewhere_and_restarts(
    pool: RayExecutor, local_pool: LocalExecutor
) -> None:
    import ray

    victim = Candidate("victim", {"seed": 5, "sleep": 1.5})
    others = plain(4, "k")
    pool.submit([victim, *others])
    running = {name: ids for name, ids in pool.in_flight().items() if ids and ids[0] == "victim"}
    assert len(running) == 1
    killed = next(iter(running))
    old_pid = pool.slot_info(killed).pid
    time.sleep(0.5)  # let the actor start sleeping inside evaluate
    ray.kill(pool.actor(killed), no_restart=False)

    results = collect(pool.as_completed(), 5)
    assert all(r.ok for r in results.values()), [r for r in results.values() if not r.ok]
    assert results["victim"].attempts == 2 and results["victim"].worker != killed
    expected = local_outcomes(local_pool, [victim, *others])
    assert {cid: r.outcome() for cid, r in results.items()} == expected

    assert pool.wait_ready(timeout=60.0) == 2, "the killed actor came back"
    assert pool.slot_info(killed).pid != old_pid, "a new process re-ran the worker factory"
    assert pool.stats()[killed].deaths >= 1


def test_worker_process_crash_is_retried_then_recorded_as_failed(pool: RayExecutor) -> None:
    deaths_before = sum(s.deaths for s in pool.stats().values())
    batch = [
        Candidate("crash_once", {"seed": 7, "crash_on_attempts": [1]}),
        Candidate("crash_always", {"seed": 8, "crash_on_attempts": [1, 2]}),
        *plain(3, "p"),
    ]
    results = collect(pool.map_unordered(batch), len(batch), within=90.0)
    once, always = results["crash_once"], results["crash_always"]
    assert once.ok and once.attempts == 2
    assert always.status == "failed" and always.attempts == 2 and always.fitness == PENALTY
    assert always.reason.startswith("worker died on each of 2 attempts")
    assert all(results[c.id].ok for c in plain(3, "p"))
    assert sum(s.deaths for s in pool.stats().values()) == deaths_before + 3


def test_overrunning_candidates_time_out_with_a_penalty(pool: RayExecutor) -> None:
    deaths_before = sum(s.deaths for s in pool.stats().values())
    batch = [
        Candidate("spins", {"seed": 1, "spin": 60}),
        Candidate("stuck", {"seed": 2, "uninterruptible": 60}),
        *plain(2, "t"),
    ]
    started = time.monotonic()
    results = collect(pool.map_unordered(batch), len(batch), within=30.0)
    assert time.monotonic() - started < TIMEOUT + GRACE + 5.0
    spins, stuck = results["spins"], results["stuck"]
    assert spins.fitness == PENALTY and spins.reason == f"timeout: evaluation exceeded {TIMEOUT:g} s"
    assert stuck.fitness == PENALTY and stuck.reason.endswith("worker killed") and stuck.attempts == 1
    assert sum(s.deaths for s in pool.stats().values()) == deaths_before + 1, "only the stuck one kills"


def test_telemetry_separates_busy_from_idle_time(pool: RayExecutor) -> None:
    collect(pool.map_unordered([Candidate("busy", {"seed": 0, "sleep": 0.5})]), 1)
    stats = pool.stats()
    busy = [s for s in stats.values() if s.busy_seconds >= 0.5]
    assert busy and all(s.alive_seconds >= s.busy_seconds for s in stats.values())
    assert all(s.setup_seconds > 0 and s.pid for s in stats.values())
    assert all(0.0 <= s.utilization <= 1.0 for s in stats.values())


def test_a_factory_that_fails_leaves_no_live_workers(ray_instance: None) -> None:
    broken = WorkerSpec(ProbeWorker, {"no_such_option": 1})
    with RayExecutor(broken, n_workers=1, start_timeout=60.0) as pool:
        with pytest.raises(NoLiveWorkersError, match="worker factory failed"):
            pool.wait_ready(timeout=60.0)
        pool.submit(plain(1))
        with pytest.raises(NoLiveWorkersError):
            list(pool.as_completed())


def test_a_pool_on_a_cluster_defaults_to_its_size_and_its_workers_draw_no_progress_bars(ray_instance: None) -> None:
    """`--ray-address` without `--workers`: one actor per GPU, here (no GPU) one per CPU of the cluster;
    actors start with the libraries' progress bars off, since Ray forwards their output to the driver."""
    import ray

    from evomerge.search.entry import local_or_ray_executor

    pool = local_or_ray_executor(None, "auto")(WorkerSpec("search_worker:ProgressBarProbe"), PENALTY, 120.0)
    try:
        resources = ray.cluster_resources()
        assert "GPU" not in resources
        assert pool.plan.n_workers == int(resources["CPU"])
        results = collect(pool.map_unordered(plain(pool.plan.n_workers)), pool.plan.n_workers)
        for result in results.values():
            assert result.metrics == {"tqdm": 1.0, "huggingface_hub": 1.0, "datasets": 1.0}, result.reason
    finally:
        pool.close()
