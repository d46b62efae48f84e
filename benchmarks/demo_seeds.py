"""The demo's spread over seeds: `evomerge search search_spaces/toy_ps.yaml --seed N` for several N,
each a fresh process and a fresh run directory, as a newcomer would run it.

Prints each seed's final test score (the number the demo prints), the sources' scores and the wall
time, then the mean, min and max; writes benchmarks/results/demo_seeds-<time>.json. The README's
demo figures come from this script.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_util import print_table, write_result

REPO = Path(__file__).resolve().parent.parent


def run_seed(space: Path, seed: int, work: Path) -> dict:
    run_dir = work / f"seed{seed}"
    started = time.perf_counter()
    command = [sys.executable, "-m", "evomerge.cli.app", "search", str(space), "--run-dir", str(run_dir)]
    done = subprocess.run([*command, "--seed", str(seed)], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"seed {seed} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    report = summary["splits"]["report"]
    sources = {Path(m).name: entry[report]["score"] for m, entry in summary["sources"].items()}
    return {
        "seed": seed,
        "final": summary["final"][report]["score"],
        "ci95": summary["final"][report].get("ci95"),
        "sources": sources,
        "evaluations": summary["evaluations"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=REPO / "search_spaces" / "toy_ps.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evomerge-demo-seeds-"))
    try:
        runs = [run_seed(args.space.resolve(), seed, work) for seed in args.seeds]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finals = [r["final"] for r in runs]
    best_source = max(max(r["sources"].values()) for r in runs)
    figures = {
        "space": str(args.space.resolve().relative_to(REPO)),
        "runs": runs,
        "final_mean": statistics.mean(finals),
        "final_min": min(finals),
        "final_max": max(finals),
        "best_source": best_source,
    }
    rows = [[r["seed"], f"{r['final']:.4f}", r["evaluations"], r["seconds"]] for r in runs]
    print_table(f"demo over seeds ({figures['space']})", ["seed", "final test score", "evaluations", "s"], rows)
    print(
        f"mean {figures['final_mean']:.4f}  min {figures['final_min']:.4f}  max {figures['final_max']:.4f}"
        f"  (best source {best_source:.4f})"
    )
    print(write_result("demo_seeds", figures))


if __name__ == "__main__":
    main()
