"""What evomerge writes gets the user's umask (0644 files, 0755 folders under umask 022), although it
writes through mkstemp (0600) and safetensors (0600): a run directory, an exported recipe and its
merged model, a report, the toy zoo."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from search_worker import make_models, write_space

from evomerge.cli.search import run_export, run_search
from evomerge.io.file_modes import current_umask
from evomerge.report.build import build_report

SPACE = """\
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add, weight: 0.5}, {name: toy_rev, weight: 0.5}]
budget: {max_evals: 12, popsize: 6, select_top_k: 2}
worker: {factory: "search_worker:ToyFitnessWorker"}
ps: {method: ties, granularity: 2}
"""


def modes(*roots: Path) -> dict[str, str]:
    """Octal permission bits of every file and folder under `roots` (roots included)."""
    found = {}
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            found[str(path)] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def expected(paths: dict[str, str], mask: int) -> dict[str, str]:
    return {p: oct((0o777 if Path(p).is_dir() else 0o666) & ~mask) for p in paths}


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_run_export_merge_and_report_follow_the_umask(umask, tmp_path):
    make_models(tmp_path / "models")
    space = write_space(tmp_path / "space.yaml", SPACE)
    run_dir = tmp_path / "runs" / "run"
    run_search(space, run_dir, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    run_export(run_dir, tmp_path / "out" / "recipe.yaml", merge_dir=tmp_path / "merged", echo=lambda *_: None)
    build_report(run_dir)

    written = modes(run_dir, tmp_path / "out", tmp_path / "merged")
    assert {Path(p).name for p in written} >= {"space.yaml", "journal.jsonl", "final.yaml", "index.html", "recipe.yaml"}
    assert any(p.endswith(".png") for p in written) and any(p.endswith(".safetensors") for p in written)
    assert written == expected(written, umask)


def test_the_zoo_follows_the_umask(mini_zoo):
    written = modes(mini_zoo)
    assert any(p.endswith(".safetensors") for p in written)
    assert written == expected(written, current_umask())
