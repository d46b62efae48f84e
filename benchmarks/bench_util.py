"""Shared by the evaluation benchmarks: the machine description, the results file, a table."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"


DEFAULT_PACKAGES = ("torch", "transformers", "lm_eval", "ray")


def machine(packages: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """What a reader needs to compare figures across runs: CPU, cores, memory, library versions."""
    import torch

    cpu = "unknown"
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")),
            cpu,
        )
    mem_kb = 0
    if Path("/proc/meminfo").exists():
        mem_kb = next(
            (
                int(line.split()[1])
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            ),
            0,
        )
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024**2, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "versions": versions,
    }


def write_result(name: str, figures: dict[str, Any], packages: Sequence[str] = DEFAULT_PACKAGES) -> Path:
    """benchmarks/results/<name>-<UTC timestamp>.json with the date and the machine."""
    now = dt.datetime.now(dt.UTC)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    payload = {"benchmark": name, "date": now.isoformat(timespec="seconds"), "machine": machine(packages), **figures}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(title)
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
