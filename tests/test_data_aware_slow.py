"""The re-basin barrier benchmark, small: two mini-zoo-sized Llamas trained from different inits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_each_step_lowers_the_plain_interpolation_barrier(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rebasin_barrier

    result = rebasin_barrier.run("mini", 300)["results"]
    plain = result["plain interpolation"]["barrier"]
    rebasin = result["rebasin + interpolation"]["barrier"]
    assert rebasin < plain
    assert result["rebasin + repair"]["barrier"] < rebasin
    assert result["interpolation + repair"]["barrier"] < plain
    assert all(row["barrier"] > 0 for row in result.values())  # no merge reaches the endpoints here
