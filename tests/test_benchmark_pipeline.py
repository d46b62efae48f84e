"""The search benchmark's rebuilt mergekit-evolve pipeline (benchmarks/mergekit_pipeline.py) on the
mini zoo: mergekit's ModelGenome decodes a genotype, mergekit's run_merge writes the model, lm-eval's
simple_evaluate scores the directory; the score equals evomerge's FitnessWorker on the same recipe,
split and items, so the benchmark's two systems measure fitness the same way.

Densities are 1.0 here: mergekit and evomerge draw DARE masks from different RNG streams, so with
density < 1 the two merges (and scores) differ by mask noise, not by a difference in the method.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mergekit.evo.genome")
pytest.importorskip("cma")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mergekit_pipeline import FitnessTask, SerialPipeline, cma_search, make_genome, split_task_folder  # noqa: E402

from evomerge.io.paths import tasks_dir  # noqa: E402
from evomerge.scoring.lm_tasks import load_tasks, task_samples  # noqa: E402
from evomerge.workers.candidate import Candidate  # noqa: E402
from evomerge.workers.fitness import FitnessWorker  # noqa: E402

TASKS = [
    {"name": "toy_add", "metric": "exact_match", "weight": 0.5, "limit": 40},
    {"name": "toy_rev", "metric": "exact_match", "weight": 0.5, "limit": 40},
]
SPLIT = "validation"
SUBSET_SEED = 7
# [layer][model][weight, density] for the mini zoo's two layers and the add, rev experts: mostly
# add, some rev (mini-zoo rev deltas hurt addition, so a larger rev weight merges to below the base)
GENOTYPE = np.array([0.8, 1.0, 0.2, 1.0, 0.8, 1.0, 0.2, 1.0])


@pytest.fixture(scope="module")
def genome(mini_zoo: Path):
    return make_genome(
        [str(mini_zoo / "add"), str(mini_zoo / "rev")], str(mini_zoo / "base"), layer_granularity=1, normalize=False
    )


@pytest.fixture(scope="module")
def worker(mini_zoo: Path) -> FitnessWorker:
    return FitnessWorker(
        sources=[str(mini_zoo / n) for n in ("base", "add", "rev")], tasks=TASKS, split=SPLIT, torch_threads=1
    )


def pipeline(genome, tmp_path: Path, dtype: str | None) -> SerialPipeline:
    yamls = [tasks_dir() / f"{t['name']}.yaml" for t in TASKS]
    folder = split_task_folder(yamls, SPLIT, tmp_path / "tasks")
    tasks = [FitnessTask(t["name"], "exact_match,none", t["weight"]) for t in TASKS]
    return SerialPipeline(genome, tasks, folder, tmp_path / "merged", seed=0, dtype=dtype)


def subset() -> dict[str, list[int]]:
    """The item indices evomerge's worker scores for (TASKS, SPLIT, SUBSET_SEED)."""
    loaded = load_tasks([t["name"] for t in TASKS], split=SPLIT)
    samples = task_samples(loaded, {t["name"]: t["limit"] for t in TASKS}, SUBSET_SEED)
    assert samples is not None
    return samples


def worker_score(worker: FitnessWorker, recipe: dict) -> float:
    result = worker.evaluate(Candidate("c", {"recipe": recipe, "seed": 0, "subset_seed": SUBSET_SEED}))
    assert result.ok, result.reason
    return result.fitness


def test_decode_merge_score_equals_the_fitness_worker(
    genome, worker: FitnessWorker, mini_zoo: Path, tmp_path: Path
) -> None:
    config = genome.genotype_merge_config(GENOTYPE)
    assert [len(s.sources) for s in config.slices] == [3, 3]  # add, rev and the base per layer
    samples = subset()
    float32 = pipeline(genome, tmp_path, "float32")
    merged = float32.merge(GENOTYPE)
    assert (merged / "config.json").exists() and any(merged.glob("*.safetensors"))
    ours = float32.score(merged, samples)
    assert not merged.exists()  # deleted after scoring, as mergekit-evolve does
    recipe = config.model_dump(mode="json", exclude_none=True) | {"dtype": "float32"}
    assert ours["score"] == pytest.approx(worker_score(worker, recipe), abs=1e-9)
    # Not a vacuous equality: the merge solves items the base does not.
    base = {"merge_method": "passthrough", "models": [{"model": str(mini_zoo / "base")}]}
    assert ours["score"] >= worker_score(worker, base) + 0.1

    # mergekit-evolve's own bfloat16 merge + evaluation may flip a few greedy answers
    bf16 = pipeline(genome, tmp_path, None).evaluate(GENOTYPE, samples)
    assert abs(bf16["score"] - ours["score"]) <= 0.1


def test_cma_driver_runs_mergekit_evolve_defaults(genome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fmin2 gets x0 = initial_genotype (weights 1/2, densities 1) and sigma0 1/6; popsize is pycma's
    4 + floor(3 ln 8) = 10; maxfevals 1 runs one generation, then fmin2 evaluates the final mean
    (its eval_final_mean default); the best genotype seen is the final choice."""
    import cma

    monkeypatch.chdir(tmp_path)  # pycma's outcmaes/
    calls: list[dict] = []
    real_fmin2 = cma.fmin2

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_fmin2(*args, **kwargs)

    monkeypatch.setattr(cma, "fmin2", spy)
    fake = pipeline(genome, tmp_path, None)
    seen: list[np.ndarray] = []

    def score_without_merging(genotype, samples=None):
        seen.append(np.array(genotype))
        return {"score": -float(np.sum((np.asarray(genotype) - 0.7) ** 2)), "metrics": {}}

    monkeypatch.setattr(fake, "evaluate", score_without_merging)
    log, es = cma_search(fake, budget=1, seed=3)
    assert np.allclose(calls[0]["x0"], [0.5, 1.0] * 4) and calls[0]["sigma0"] == pytest.approx(1 / 6)
    assert "popsize" not in calls[0]["options"] and "bounds" not in calls[0]["options"]
    assert es.popsize == 10 and len(log.scores) == 11
    assert np.allclose(seen[-1], es.result.xfavorite)
    assert log.best_score == max(log.scores)
    again, _ = cma_search(fake, budget=1, seed=3)
    assert again.scores == log.scores  # seeded: reproducible, unlike mergekit-evolve's ignored seed
