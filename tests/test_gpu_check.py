"""benchmarks/gpu_check.py runs on CPU with a tiny model (`--device cpu --tiny`), so the script a GPU
session runs once cannot rot between sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    command += ["--candidates", "2", "--timed", "1", "--batch", "2", "--prompt-tokens", "6", "--new-tokens", "3"]
    command += ["--out", str(out), "--work", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    equality = report["equality"]["methods"]
    assert {"ties", "dare_ties", "della", "slerp", "linear"} <= set(equality)
    for label, row in equality.items():  # on one device every path gives the merge's bits
        assert row["auto_vs_device_merge"] == 0.0, label
        assert row.get("compiled_vs_device_merge", 0.0) == 0.0, label
    assert report["equality"]["flat_candidates"] > 0 and report["equality"]["compiled_jobs"] > 0
    timed = report["materialize"]["methods"]
    assert all(row["ratio_vs_floor"] > 0 and row["bytes_per_element"] >= 6 for row in timed.values())
    search = report["search"]
    assert search["candidates"] == 2 and search["evals_per_hour"] > 0
    assert abs(sum(search["split_fraction"].values()) - 1) < 0.05
    assert report["memory"]["sources_gb"] > 0
