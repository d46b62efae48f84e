"""Evaluations per hour on the toy zoo, in process and on Ray, and where worker time goes.

A stream of search-like candidates (dare_ties over the three experts, weights and densities drawn
from a seeded RNG, a mask seed each) is scored by `FitnessWorker` on the three toy tasks
(`--limit` items of the `--split` split each), first by a `LocalExecutor` (one worker, one torch
thread), then by a `RayExecutor` with two actors on a local Ray instance. Worker start-up (loading
models, tasks, Ray itself) is excluded from throughput and reported separately.

`overhead_fraction` is the share of worker time (`EvalResult.seconds`, the whole `evaluate` call)
spent outside the model's forward passes: materialization, lm-eval request building, tokenization,
generation bookkeeping and metrics. Target: <= 10%.

    .venv/bin/python benchmarks/eval_throughput.py [--candidates 24] [--limit 100] [--batch-size 512]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported here and in the Ray actors

from bench_util import print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("toy_add", "toy_rev", "toy_shift")


def candidates(zoo: Path, count: int, limit: int, split: str, prefix: str):
    from evomerge.evaluation.candidate import Candidate

    rng = random.Random(0)
    tasks = [{"name": t, "metric": "exact_match", "weight": 1 / len(TASKS), "limit": limit} for t in TASKS]
    out = []
    for i in range(count):
        models = [{"model": str(zoo / name), "parameters": {"weight": round(rng.uniform(0.3, 1.0), 4),
                                                             "density": round(rng.uniform(0.3, 1.0), 4)}}
                  for name in ("add", "rev", "shift")]
        recipe = {"merge_method": "dare_ties", "base_model": str(zoo / "base"), "models": models}
        out.append(Candidate(f"{prefix}{i}", {"recipe": recipe, "seed": i, "tasks": tasks, "split": split,
                                              "subset_seed": 1}))
    return out


def run_pool(pool, batch) -> tuple[float, list]:
    started = time.perf_counter()
    results = list(pool.map_unordered(batch))
    return time.perf_counter() - started, results


def breakdown(results) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    total = sum(r.seconds for r in ok)
    forward = sum(r.timings.get("forward", 0.0) for r in ok)
    materialize = sum(r.timings.get("materialize", 0.0) for r in ok)
    evaluate = sum(r.timings.get("eval", 0.0) for r in ok)
    return {"worker_seconds": total, "forward_seconds": forward, "materialize_seconds": materialize,
            "lm_eval_outside_forward_seconds": evaluate - forward,
            "other_seconds": total - evaluate - materialize,
            "overhead_fraction": (total - forward) / total if total else float("nan"),
            "seconds_per_eval": total / len(ok) if ok else float("nan"), "failed": len(results) - len(ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "runs" / "zoo", help="built on first use")
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--limit", type=int, default=100, help="items per task per evaluation")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    import torch

    from evomerge.evaluation.candidate import WorkerSpec
    from evomerge.evaluation.executors import LocalExecutor, RayExecutor
    from evomerge.evaluation.ray_cluster import ray_session
    from evomerge.zoo import ensure_zoo

    torch.set_num_threads(1)
    zoo = ensure_zoo(args.zoo)
    spec = WorkerSpec("evomerge.evaluation.fitness:FitnessWorker", {
        "sources": [str(zoo / n) for n in ("base", "add", "rev", "shift")],
        "tasks": [{"name": t, "limit": args.limit} for t in TASKS], "split": args.split,
        "batch_size": args.batch_size})
    figures: dict = {"zoo": str(zoo), "candidates": args.candidates, "limit_per_task": args.limit,
                     "tasks": list(TASKS), "split": args.split, "batch_size": args.batch_size}

    started = time.perf_counter()
    with LocalExecutor(spec, torch_threads=1) as pool:
        figures["local_setup_seconds"] = time.perf_counter() - started
        run_pool(pool, candidates(zoo, 2, args.limit, args.split, "warm"))  # first-call costs (imports, caches)
        wall, results = run_pool(pool, candidates(zoo, args.candidates, args.limit, args.split, "local"))
    local = breakdown(results)
    figures.update({"local_wall_seconds": wall, "evals_per_hour_local": args.candidates / wall * 3600,
                    "local": local, "overhead_fraction": local["overhead_fraction"],
                    "mean_fitness": sum(r.fitness for r in results) / len(results)})

    rows = [["local (1 worker)", figures["evals_per_hour_local"], local["seconds_per_eval"],
             local["overhead_fraction"], local["failed"]]]
    if not args.no_ray:
        temp = Path(tempfile.mkdtemp(prefix="evo-ray-"))
        try:
            started = time.perf_counter()
            with ray_session("local", temp_dir=temp, num_cpus=2, logging_level="ERROR"), \
                    RayExecutor(spec, n_workers=2, start_timeout=300) as pool:
                pool.wait_ready(timeout=300)
                figures["ray_setup_seconds"] = time.perf_counter() - started
                run_pool(pool, candidates(zoo, 4, args.limit, args.split, "warm"))
                wall, ray_results = run_pool(pool, candidates(zoo, args.candidates, args.limit, args.split, "ray"))
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        ray = breakdown(ray_results)
        figures.update({"ray_wall_seconds": wall, "evals_per_hour_ray": args.candidates / wall * 3600, "ray": ray,
                        "ray_workers": 2, "ray_speedup_vs_local": figures["local_wall_seconds"] / wall})
        same = {r.candidate_id[len("ray"):]: r.outcome()[1:] for r in ray_results} == \
            {r.candidate_id[len("local"):]: r.outcome()[1:] for r in results}
        figures["ray_results_equal_local"] = same
        rows.append(["ray (2 workers)", figures["evals_per_hour_ray"], ray["seconds_per_eval"],
                     ray["overhead_fraction"], ray["failed"]])
    figures["target_overhead_le_0.10"] = figures["overhead_fraction"] <= 0.10
    print_table(f"eval throughput: {args.candidates} candidates, {len(TASKS)} tasks x {args.limit} items "
                f"({args.split}), batch {args.batch_size}",
                ["executor", "evals/hour", "worker s/eval", "overhead_fraction", "failed"], rows)
    part = figures["local"]
    print(f"local worker time: forward {part['forward_seconds']:.2f} s, "
          f"materialize {part['materialize_seconds']:.2f} s, "
          f"lm-eval outside forward {part['lm_eval_outside_forward_seconds']:.2f} s, "
          f"other {part['other_seconds']:.2f} s")
    print(f"written: {write_result('eval_throughput', figures)}")


if __name__ == "__main__":
    main()
