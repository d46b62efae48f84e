"""Evaluations per hour on the toy zoo, in process and on Ray, and where worker time goes.

Two workloads, each scored by `FitnessWorker` first in a `LocalExecutor` (one worker, one torch
thread, as `evomerge search` runs by default) and then in a `RayExecutor` with two actors:

- `toy_ps` (the first row, the headline figures): what the demo search sends. Genomes drawn
  uniformly within the bounds of `search_spaces/toy_ps.yaml` are decoded by that space (TIES over
  the add and rev experts, a weight and a density per model per layer) into the payloads the
  search builds (`make_payload`: toy_add + toy_rev, 100 seeded train items each) for the worker the
  search builds (`search.worker_spec`: the worker's default batch size, 64).
- `three_tasks`: the earlier benchmark's workload, DARE-TIES over three experts, toy_add +
  toy_rev + toy_shift x 100 train items, batch 512.

`--generators` picks how lm-eval's `generate_until` requests are answered: `lean` (the worker's
default, evomerge.scoring.greedy_lm), `hf` (lm-eval's HFLM with HF `generate`), or `default`
(no worker argument at all, for running this script against an older checkout through
PYTHONPATH). Worker start-up (loading models, tasks, Ray itself) is excluded from throughput and
reported separately.

`overhead_fraction` is the share of worker time (`EvalResult.seconds`, the whole `evaluate` call)
spent outside the model's top-level forward calls: materialisation, lm-eval request handling,
tokenisation, the decode loop, metrics. It depends on model size: the toy models (hidden 64, 4
layers) take ~1 ms per forward call, so fixed per-item and per-candidate costs weigh far more here
than on a real model. Materialisation is reported on its own (`materialize_fraction`) as well.

    .venv/bin/python benchmarks/eval_throughput.py [--candidates 24] [--workloads toy_ps,three_tasks]
        [--generators lean,hf] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported here and in the Ray actors

from bench_util import print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "search_spaces" / "toy_ps.yaml"
THREE_TASKS = ("toy_add", "toy_rev", "toy_shift")
GENERATOR_KWARGS: dict[str, dict[str, Any]] = {
    "lean": {"lean_generate": True},
    "hf": {"lean_generate": False},
    "default": {},
}


class Workload:
    """A worker spec plus a seeded stream of candidate payloads."""

    def __init__(self, name: str, spec_kwargs: dict[str, Any], payloads, describe: str):
        self.name, self.spec_kwargs, self.payloads, self.describe = name, spec_kwargs, payloads, describe

    def spec(self, generator: str):
        from evomerge.workers.candidate import WorkerSpec

        return WorkerSpec("evomerge.workers.fitness:FitnessWorker", {**self.spec_kwargs, **GENERATOR_KWARGS[generator]})

    def candidates(self, count: int, prefix: str, seed: int):
        from evomerge.workers.candidate import Candidate

        return [Candidate(f"{prefix}{i}", payload) for i, payload in enumerate(self.payloads(count, seed))]


def toy_ps_workload() -> Workload:
    from evomerge.search.driver import worker_spec
    from evomerge.search.payload import make_payload
    from evomerge.search.space.config import load_space_config
    from evomerge.search.space.space import SearchSpace
    from evomerge.zoo.models import verify_zoo

    config = load_space_config(SPACE)
    assert config.zoo is not None
    verify_zoo(SPACE.parent / config.zoo.path, seed=config.zoo.seed, mini=config.zoo.mini)
    space = SearchSpace(config, root=SPACE.parent)
    spec = worker_spec(space)

    def payloads(count: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        out = []
        for i in range(count):
            genome = [rng.uniform(lo, hi) for lo, hi in zip(space.lower, space.upper, strict=True)]
            out.append(make_payload(space.decode(genome, seed=seed * 1000 + i), space.config, config.splits.search))
        return out

    tasks = ", ".join(f"{t.name} x {t.limit}" for t in config.tasks)
    return Workload(
        "toy_ps",
        dict(spec.kwargs),
        payloads,
        f"toy_ps demo: {config.ps.method} over {len(space.compared_models)} experts, {tasks} "
        f"({config.splits.search}), batch {spec.kwargs.get('batch_size', 'worker default')}",
    )


def three_task_workload(zoo: Path, limit: int = 100, batch_size: int = 512) -> Workload:
    tasks = [{"name": t, "metric": "exact_match", "weight": 1 / len(THREE_TASKS), "limit": limit} for t in THREE_TASKS]

    def payloads(count: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        out = []
        for i in range(count):
            models = [
                {
                    "model": str(zoo / name),
                    "parameters": {
                        "weight": round(rng.uniform(0.3, 1.0), 4),
                        "density": round(rng.uniform(0.3, 1.0), 4),
                    },
                }
                for name in ("add", "rev", "shift")
            ]
            recipe = {
                "merge_method": "dare_ties",
                "base_model": str(zoo / "base"),
                "parameters": {"rescale_norm": "inverse"},  # the kernels' rescaling (mergekit's L1 runs eager)
                "models": models,
            }
            out.append({"recipe": recipe, "seed": seed * 1000 + i, "tasks": tasks, "split": "train", "subset_seed": 1})
        return out

    spec = {
        "sources": [str(zoo / n) for n in ("base", "add", "rev", "shift")],
        "tasks": [{"name": t, "limit": limit} for t in THREE_TASKS],
        "split": "train",
        "batch_size": batch_size,
    }
    return Workload(
        "three_tasks",
        spec,
        payloads,
        f"three_tasks: dare_ties over 3 experts, {len(THREE_TASKS)} tasks x {limit} (train), batch {batch_size}",
    )


def run_pool(pool, batch) -> tuple[float, list]:
    started = time.perf_counter()
    results = list(pool.map_unordered(batch))
    return time.perf_counter() - started, results


def breakdown(results, wall: float) -> dict[str, float]:
    """Worker-time split of successful results (seconds summed over candidates, ms per candidate)."""
    ok = [r for r in results if r.ok]
    n = max(len(ok), 1)
    total = sum(r.seconds for r in ok)
    forward = sum(r.timings.get("forward", 0.0) for r in ok)
    materialize = sum(r.timings.get("materialize", 0.0) for r in ok)
    evaluate = sum(r.timings.get("eval", 0.0) for r in ok)
    nan = float("nan")
    return {
        "evals_per_hour": len(results) / wall * 3600,
        "wall_seconds": wall,
        "failed": len(results) - len(ok),
        "worker_seconds": total,
        "ms_per_eval": total / n * 1000,
        "forward_ms": forward / n * 1000,
        "materialize_ms": materialize / n * 1000,
        "lm_eval_outside_forward_ms": (evaluate - forward) / n * 1000,
        "other_ms": (total - evaluate - materialize) / n * 1000,
        "overhead_fraction": (total - forward) / total if total else nan,
        "materialize_fraction": materialize / total if total else nan,
        "overhead_fraction_without_materialize": (total - forward - materialize) / total if total else nan,
        "mean_fitness": sum(r.fitness for r in ok) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", type=Path, default=ROOT / "zoo" / "toy", help="a zoo directory (default: the shipped one)"
    )
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--workloads", default="toy_ps,three_tasks")
    parser.add_argument("--generators", default="lean,hf", help="comma list of lean, hf, default")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    import torch

    import evomerge
    from evomerge.workers.executors import LocalExecutor, RayExecutor
    from evomerge.workers.ray_cluster import ray_session
    from evomerge.zoo.models import verify_zoo

    torch.set_num_threads(1)
    zoo = args.zoo
    verify_zoo(zoo)
    builders = {"toy_ps": toy_ps_workload, "three_tasks": lambda: three_task_workload(zoo)}
    workloads = [builders[name]() for name in args.workloads.split(",")]
    generators = args.generators.split(",")
    unknown = [g for g in generators if g not in GENERATOR_KWARGS]
    if unknown:
        raise SystemExit(f"--generators: unknown {unknown}; use lean, hf or default")
    figures: dict[str, Any] = {
        "zoo": str(zoo),
        "candidates": args.candidates,
        "evomerge_package": evomerge.__file__,
        "workloads": {w.name: w.describe for w in workloads},
        "rows": [],
    }

    def record(workload: Workload, generator: str, executor: str, wall: float, results, setup: float) -> None:
        row = {
            "workload": workload.name,
            "generator": generator,
            "executor": executor,
            "setup_seconds": setup,
            **breakdown(results, wall),
        }
        row["results"] = {r.candidate_id.split("-", 1)[1]: r.outcome()[1:] for r in results}
        figures["rows"].append(row)

    for workload in workloads:
        for generator in generators:
            started = time.perf_counter()
            with LocalExecutor(workload.spec(generator), torch_threads=1) as pool:
                setup = time.perf_counter() - started
                run_pool(pool, workload.candidates(2, "warm-", seed=99))  # first-call costs (imports, caches)
                wall, results = run_pool(pool, workload.candidates(args.candidates, "local-", seed=0))
            record(workload, generator, "local", wall, results, setup)

    if not args.no_ray:
        temp = Path(tempfile.mkdtemp(prefix="evo-ray-"))
        try:
            with ray_session("local", temp_dir=temp, num_cpus=2, logging_level="ERROR"):
                for workload in workloads:
                    for generator in generators:
                        started = time.perf_counter()
                        with RayExecutor(workload.spec(generator), n_workers=2, start_timeout=300) as pool:
                            pool.wait_ready(timeout=300)
                            setup = time.perf_counter() - started
                            run_pool(pool, workload.candidates(4, "warm-", seed=99))
                            wall, results = run_pool(pool, workload.candidates(args.candidates, "ray-", seed=0))
                        record(workload, generator, "ray (2 workers)", wall, results, setup)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    rows = figures["rows"]
    for row in rows:  # every generator and executor must agree on every candidate's outcome
        reference = next(r for r in rows if r["workload"] == row["workload"])
        row["results_equal_first_row"] = row["results"] == reference["results"]
    head = rows[0]
    figures["headline"] = {"workload": head["workload"], "generator": head["generator"]}
    figures["evals_per_hour_local"] = head["evals_per_hour"]
    figures["overhead_fraction"] = head["overhead_fraction"]
    figures["materialize_fraction"] = head["materialize_fraction"]
    ray_head = [
        r
        for r in rows
        if r["workload"] == head["workload"] and r["generator"] == head["generator"] and r["executor"] != "local"
    ]
    if ray_head:
        figures["evals_per_hour_ray"] = ray_head[0]["evals_per_hour"]
    figures["target_overhead_le_0.10"] = figures["overhead_fraction"] <= 0.10

    print_table(
        f"eval throughput: {args.candidates} candidates per row",
        [
            "workload",
            "generate",
            "executor",
            "evals/hour",
            "worker ms/eval",
            "forward",
            "materialize",
            "lm-eval outside fwd",
            "overhead_fraction",
            "w/o materialize",
            "same results",
        ],
        [
            [
                r["workload"],
                r["generator"],
                r["executor"],
                round(r["evals_per_hour"]),
                r["ms_per_eval"],
                r["forward_ms"],
                r["materialize_ms"],
                r["lm_eval_outside_forward_ms"],
                r["overhead_fraction"],
                r["overhead_fraction_without_materialize"],
                r["results_equal_first_row"],
            ]
            for r in rows
        ],
    )
    for w in workloads:
        print(f"  {w.describe}")
    print(f"written: {write_result('eval_throughput', figures)}")


if __name__ == "__main__":
    main()
