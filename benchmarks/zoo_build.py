"""Measure the toy zoo build (full and --mini) against its time budgets and quality targets.

    python benchmarks/zoo_build.py [--seed 0] [--skip-full]

Each build runs in a fresh process (`evomerge zoo build`), as a user would run it; the table shows
wall time, the manifest's own build_seconds and every target; JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def build(out: Path, seed: int, mini: bool) -> dict:
    cmd = [sys.executable, "-m", "evomerge.cli", "zoo", "build", str(out), "--seed", str(seed)]
    cmd += ["--mini"] if mini else []
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    return {"flavour": "mini" if mini else "full", "wall_seconds": round(wall, 1),
            "build_seconds": manifest["build_seconds"], "targets": manifest["targets"],
            "models": {name: m["test_exact_match"] for name, m in manifest["models"].items()},
            "hand_merge": manifest["hand_merge"]["test_exact_match"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mini in ([True] if args.skip_full else [True, False]):
            rows.append(build(Path(tmp) / ("mini" if mini else "full"), args.seed, mini))
    print(f"{'zoo':6s} {'wall s':>8s} {'build s':>8s} {'budget s':>9s}  all targets met")
    for row in rows:
        budget = 60 if row["flavour"] == "mini" else 300
        met = all(row["targets"].values())
        print(f"{row['flavour']:6s} {row['wall_seconds']:8.1f} {row['build_seconds']:8.1f} {budget:9d}  {met}")
    stamp = datetime.now(timezone.utc)
    result = {"benchmark": "zoo_build", "date": stamp.isoformat(timespec="seconds"), "seed": args.seed,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"zoo_build-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
