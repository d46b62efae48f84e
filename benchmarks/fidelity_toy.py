"""Staged evaluation on the toy zoo: the demo PS search with and without `fidelity:` stages.

Same space (search_spaces/toy_ps.yaml), seed and budget; the only change is a `fidelity:` block.
Reports per seed the items the workers scored in the search (the forward-pass cost; selection and
report scoring is identical in both), the final recipe's test score with its 95% CI, and wall time.

    .venv/bin/python benchmarks/fidelity_toy.py [--seeds 0 1 2] [--max-evals 192] [--stages 25 50] [--rank 1]

Writes benchmarks/results/fidelity_toy-<UTC>.json; runs go to benchmarks/work/fidelity_toy/.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import WORK, print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "toy_ps.yaml"


def space_file(out: Path, stages: list[int] | None, z: float, rank: int) -> Path:
    """toy_ps.yaml with absolute paths (it lives elsewhere now), plus the fidelity block when given."""
    data = yaml.safe_load(SPACE.read_text())
    for key in ("models",):
        data[key] = [str((SPACE.parent / m).resolve()) for m in data[key]]
    data["base_model"] = str((SPACE.parent / data["base_model"]).resolve())
    data["zoo"]["path"] = str((SPACE.parent / data["zoo"]["path"]).resolve())
    if stages:
        data["fidelity"] = {"stages": stages, "z": z, "rank": rank}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def one_run(name: str, stages: list[int] | None, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.cli.search import run_search

    work = WORK / "fidelity_toy"
    run_dir = work / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    path = space_file(work / f"{name}.yaml", stages, args.z, args.rank)
    started = time.perf_counter()
    summary = run_search(
        path, run_dir, workers=args.workers, ray_address=None, max_evals=args.max_evals, seed=seed, echo=lambda *_: None
    )
    test = summary["final"]["test"]
    return {
        "config": name,
        "seed": seed,
        "stages": stages,
        "items_scored": summary["items_scored"],
        "test_score": test["score"],
        "test_ci95": test.get("ci95"),
        "validation_score": summary["final"]["validation"]["score"],
        "evaluations": summary["evaluations"],
        "seconds": round(time.perf_counter() - started, 1),
        "run_dir": str(run_dir.relative_to(ROOT)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-evals", type=int, default=192)
    parser.add_argument("--stages", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--z", type=float, default=1.96)
    parser.add_argument("--rank", type=int, default=1, help="race against the rank-th best lower bound")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        for name, stages in (("full", None), ("staged", args.stages)):
            runs.append(one_run(name, stages, seed, args))
            print(runs[-1], flush=True)
    by_config = {}
    for name in ("full", "staged"):
        mine = [r for r in runs if r["config"] == name]
        by_config[name] = {
            "items_scored_mean": statistics.mean(r["items_scored"] for r in mine),
            "test_score_mean": statistics.mean(r["test_score"] for r in mine),
            "seconds_mean": statistics.mean(r["seconds"] for r in mine),
        }
    saving = 1 - by_config["staged"]["items_scored_mean"] / by_config["full"]["items_scored_mean"]
    within = [
        full["test_ci95"][0] <= staged["test_score"] <= full["test_ci95"][1]  # staged inside full's CI
        for full, staged in zip(runs[0::2], runs[1::2], strict=True)
    ]
    within_ci = all(within)
    figures = {
        "space": str(SPACE.relative_to(ROOT)),
        "max_evals": args.max_evals,
        "z": args.z,
        "rank": args.rank,
        "stages": args.stages,
        "runs": runs,
        "by_config": by_config,
        "items_saving": round(saving, 4),
        "staged_score_within_full_ci_per_seed": within,
        "final_scores_within_ci": within_ci,
    }
    path = write_result("fidelity_toy", figures)
    print_table(
        "toy_ps with and without fidelity stages",
        ["config", "seed", "items scored", "test score", "95% CI", "seconds"],
        [
            [
                r["config"],
                r["seed"],
                r["items_scored"],
                r["test_score"],
                "[{:.3f}, {:.3f}]".format(*r["test_ci95"]),
                r["seconds"],
            ]
            for r in runs
        ],
    )
    print(f"items saved: {saving:.1%}; staged test score inside the full run's CI per seed: {within}; wrote {path}")


if __name__ == "__main__":
    main()
