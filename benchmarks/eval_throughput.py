"""Evaluations per hour, in process and on Ray, and where worker time goes: toy zoo and a ~100M model.

Three workloads, each scored by `FitnessWorker` in a `LocalExecutor` (one worker, one torch
thread, as `evomerge search` runs by default) and, for the toy ones, in a `RayExecutor` with two
actors:

- `realistic` (issue #18, target overhead_fraction <= 0.05): a 94M-parameter Qwen2-style model
  with a byte-level BPE tokenizer trained here (realistic_workload.py), TIES over two fine-tunes
  with per-layer weights and densities, a generate_until task with 32-token answers and a
  multiple-choice loglikelihood task, 50 items each, batch 64 (the worker default). In process only.
- `toy_ps` (the toy headline figures; no target): what the demo search sends. Genomes drawn
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

The split, one definition for every workload and generator:

- worker time = `EvalResult.seconds`, the whole `evaluate` call of the worker;
- forward = time inside the model's top-level forward calls (`ForwardTimer`: a pre-hook and a hook
  on the model). Every call counts the same way: a loglikelihood batch, a prefill and each
  decode step alike;
- overhead = worker time - forward: materialisation, planning, lm-eval request handling,
  tokenisation, log-softmax and metrics, and the decode loop's own work between its forward calls
  (argmax, reading tokens back, stop checks). The decode loop is neither excluded from worker time
  nor counted as forward beyond its forward calls.

`overhead_fraction` = overhead / worker time, summed over candidates (`overhead_fraction_median`:
median of the per-candidate fractions); materialisation is also reported on its own
(`materialize_fraction`). The toy models (hidden 64, 4 layers) take ~1-2 ms per forward call, so
fixed per-item and per-candidate costs weigh far more there than on a real model; that is why
the target is read on `realistic`.

    .venv/bin/python benchmarks/eval_throughput.py [--candidates 24] [--realistic-candidates 4]
        [--workloads realistic,toy_ps,three_tasks] [--generators lean,hf] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported here and in the Ray actors

from bench_util import WORK, print_table, write_result  # noqa: E402

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

    def __init__(self, name: str, spec_kwargs: dict[str, Any], payloads, describe: str, ray: bool = True):
        self.name, self.spec_kwargs, self.payloads, self.describe = name, spec_kwargs, payloads, describe
        self.ray = ray  # the realistic workload runs in process only (a Ray pair would double its minutes)

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


def realistic_workload(method: str = "ties", batch_size: int = 64) -> Workload:
    """`realistic`: a ~100M Qwen2-style model with a trained BPE tokenizer (realistic_workload.py),
    `method` over two fine-tunes with per-layer (gradient) weights and densities, rw_gen (~30-token
    answers) + rw_mc (4 choices) x 50 items, batch 64 (the worker default)."""
    import realistic_workload as rw

    paths, task_dir = rw.build(WORK / "realistic")
    tasks = [
        {"name": rw.GEN_TASK, "metric": "exact_match", "weight": 0.5, "limit": rw.ITEMS},
        {"name": rw.MC_TASK, "metric": "acc", "weight": 0.5, "limit": rw.ITEMS},
    ]

    def payloads(count: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        out = []
        for i in range(count):
            models = [
                {
                    "model": str(paths[name]),
                    "parameters": {
                        "weight": [round(rng.uniform(0.3, 1.0), 4) for _ in range(3)],
                        "density": [round(rng.uniform(0.3, 1.0), 4) for _ in range(3)],
                    },
                }
                for name in ("ft1", "ft2")
            ]
            recipe = {"merge_method": method, "base_model": str(paths["base"]), "models": models}
            out.append({"recipe": recipe, "seed": seed * 1000 + i, "tasks": tasks, "split": "train", "subset_seed": 1})
        return out

    spec = {
        "sources": [str(p) for p in paths.values()],
        "tasks": [{"name": t["name"], "limit": rw.ITEMS} for t in tasks],
        "include_paths": [str(task_dir)],
        "split": "train",
        "batch_size": batch_size,
    }
    return Workload(
        "realistic",
        spec,
        payloads,
        f"realistic: {method} over 2 fine-tunes of a 94M Qwen2-style model (BPE 6.9K tokens, 16K vocab), "
        f"rw_gen (32-token answers) + rw_mc (4 choices) x {rw.ITEMS} (train), batch {batch_size}",
        ray=False,
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
        "overhead_fraction_median": statistics.median(
            (r.seconds - r.timings.get("forward", 0.0)) / r.seconds for r in ok if r.seconds
        )
        if ok
        else nan,
        "mean_fitness": sum(r.fitness for r in ok) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", type=Path, default=ROOT / "zoo" / "toy", help="a zoo directory (default: the shipped one)"
    )
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--workloads", default="realistic,toy_ps,three_tasks")
    parser.add_argument("--realistic-candidates", type=int, default=4, help="timed candidates of `realistic`")
    parser.add_argument("--realistic-method", default="ties", help="merge method of `realistic` (default ties)")
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
    builders = {
        "toy_ps": toy_ps_workload,
        "three_tasks": lambda: three_task_workload(zoo),
        "realistic": lambda: realistic_workload(args.realistic_method),
    }
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
            count = args.realistic_candidates if workload.name == "realistic" else args.candidates
            with LocalExecutor(workload.spec(generator), torch_threads=1) as pool:
                setup = time.perf_counter() - started
                run_pool(pool, workload.candidates(2, "warm-", seed=99))  # first-call costs (imports, caches)
                wall, results = run_pool(pool, workload.candidates(count, "local-", seed=0))
            record(workload, generator, "local", wall, results, setup)

    if not args.no_ray:
        temp = Path(tempfile.mkdtemp(prefix="evo-ray-"))
        try:
            with ray_session("local", temp_dir=temp, num_cpus=2, logging_level="ERROR"):
                for workload in [w for w in workloads if w.ray]:
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
    realistic = [r for r in rows if r["workload"] == "realistic" and r["generator"] == generators[0]]
    if realistic:
        figures["realistic_overhead_fraction"] = realistic[0]["overhead_fraction"]
        figures["target_realistic_overhead_le_0.05"] = realistic[0]["overhead_fraction"] <= 0.05
    head = next((r for r in rows if r["workload"] != "realistic"), rows[0])
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

    print_table(
        f"eval throughput: {args.candidates} candidates per row ({args.realistic_candidates} for realistic); "
        f"load average {os.getloadavg()[0]:.2f}",
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
