"""DFS on a planted problem: the best path is known by construction (evomerge.zoo.planted).

The shipped toy zoo's `add` expert T is split into a `damaged` copy (one inner layer replaced by
noise) and a `carrier` (T's layers in rotated slots, its residual stream `shift` times larger).
The planted path (damaged's outer layers around the carrier's copy of the missing layer, entered
with scale `shift` and left with 1/shift) computes T exactly. Relations checked, not values one
machine reached: the path rebuilds T's score; without its transition scales it loses a margin
(the paper's reason for W); a DFS search at a stated budget finds a path within noise of it; the
same search with scales pinned to 1 does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.cli.search import run_search
from evomerge.io.paths import shipped_zoo
from evomerge.search.space.dfs import Step, path_to_recipe
from evomerge.workers.candidate import Candidate
from evomerge.workers.fitness import FitnessWorker
from evomerge.zoo.models import verify_zoo
from evomerge.zoo.planted import build_planted

torch.set_num_threads(1)

LIMIT = 40  # items per score (search and selection); the test split is scored whole
TASKS = [{"name": "toy_add", "metric": "exact_match", "weight": 1.0, "limit": LIMIT}]
BUDGET = 200  # evaluations per search: ~18 generations of the default population (11 for 12 genes)
NOISE = 0.05  # two scores of one model on 40 / 500 items that differ by less are "the same"
SCALE_MARGIN = 0.15  # the planted path loses at least this without its scales (measured: 1.0 -> 0.6)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    verify_zoo(shipped_zoo(), seed=0)
    return build_planted(shipped_zoo() / "add", tmp_path_factory.mktemp("planted"), hole=2, shift=3.0)


@pytest.fixture(scope="module")
def worker(planted) -> FitnessWorker:
    return FitnessWorker(sources=[str(planted.damaged), str(planted.carrier)], tasks=TASKS, split="validation")


def score(worker: FitnessWorker, planted, steps: list[Step]) -> float:
    recipe = path_to_recipe(steps, [str(planted.damaged), str(planted.carrier)], ("o_proj", "down_proj"))
    payload = {
        "recipe": recipe.model_dump(mode="json", exclude_none=True),
        "seed": None,
        "tasks": TASKS,
        "split": "validation",
        "subset_seed": 0,
    }
    result = worker.evaluate(Candidate("path", payload))
    assert result.ok, result.reason
    return result.fitness


def test_the_planted_path_rebuilds_the_teacher_and_needs_its_scales(worker, planted) -> None:
    teacher = score(worker, planted, [Step(0, 0), Step(0, 1), Step(0, 2), Step(0, 3)])  # noise at layer 2
    rebuilt = score(worker, planted, [Step(*step) for step in planted.path])
    unscaled = score(worker, planted, [Step(m, layer) for m, layer, _ in planted.path])
    skipped = score(worker, planted, [Step(0, 0), Step(0, 1), Step(0, 3)])
    # the damaged model (a source) and the path without the missing layer are far below the planted path
    assert rebuilt >= max(teacher, skipped) + 0.5
    assert unscaled <= rebuilt - SCALE_MARGIN


def search_space(root: Path, name: str, planted, dfs: dict, seed: int) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"""\
models: [{planted.damaged}, {planted.carrier}]
tasks: [{{name: toy_add, limit: {LIMIT}}}]
splits: {{search: train, select: validation, report: test}}
budget: {{max_evals: {BUDGET}, sigma0: 0.1667, select_top_k: 3}}
seed: {seed}
dfs: {json.dumps(dfs)}
"""
    )
    return path


def search(root: Path, name: str, planted, dfs: dict, seed: int = 0) -> dict:
    summary = run_search(
        search_space(root, name, planted, dfs, seed),
        root / name,
        workers=1,
        ray_address=None,
        max_evals=None,
        seed=None,
        echo=lambda *_: None,
    )
    return summary["final"]


# the paper's layout and start (off slots at 0), W per model pair, bounds that hold the planted shift
DFS = {"repeats": 1, "scales": "model_pair", "scale_bounds": [0.25, 4.0]}


def test_dfs_search_finds_a_path_as_good_as_the_planted_one_and_scales_are_what_it_needs(
    worker, planted, tmp_path
) -> None:
    rebuilt_test = score(worker, planted, [Step(*step) for step in planted.path])
    found = search(tmp_path, "searched", planted, DFS)
    pinned = search(tmp_path, "pinned", planted, {**DFS, "scale_bounds": [0.999999, 1.000001]})
    assert found["validation"]["score"] >= rebuilt_test - NOISE
    assert found["test"]["score"] >= pinned["test"]["score"] + SCALE_MARGIN / 2
