"""The lm-eval fitness worker on the real mini zoo: its scores equal `evomerge eval` on the model
directory `evomerge merge` writes for the same recipe, split, limit and subset seed; failures come
back as failed results with a reason; a Ray pool of two workers agrees with the in-process pool."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from evomerge.cli.evaluate import run_eval
from evomerge.merge.recipe import dump_recipe, parse_recipe
from evomerge.merge.runner import merge_from_file
from evomerge.search.space.dfs import Step, path_to_recipe
from evomerge.workers.candidate import Candidate, WorkerSpec
from evomerge.workers.executors import LocalExecutor, RayExecutor
from evomerge.workers.fitness import FitnessWorker, TaskWeight, weighted_fitness

torch.set_num_threads(1)

TASKS = [
    {"name": "toy_add", "metric": "exact_match", "weight": 0.7, "limit": 40},
    {"name": "toy_rev", "metric": "exact_match", "weight": 0.3, "limit": 40},
]
SPLIT = "validation"
SUBSET_SEED = 11


def ties(zoo: Path, weight: float = 1.0, density: float = 0.7) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "add"), "parameters": {"weight": weight, "density": density}},
            {"model": str(zoo / "rev"), "parameters": {"weight": weight, "density": [0.4, 0.9]}},
        ],
    }


def dfs_path(zoo: Path) -> dict:
    steps = [Step(0, 0), Step(1, 0, 0.9), Step(1, 1), Step(0, 1, 1.2)]
    return path_to_recipe(steps, [str(zoo / "add"), str(zoo / "rev")], ("o_proj", "down_proj")).model_dump(
        mode="json", exclude_none=True
    )


def payload(recipe: dict, seed: int | None = 5, **extra) -> dict:
    return {"recipe": recipe, "seed": seed, "tasks": TASKS, "split": SPLIT, "subset_seed": SUBSET_SEED, **extra}


@pytest.fixture(scope="module")
def worker(mini_zoo: Path) -> FitnessWorker:
    return FitnessWorker(sources=[str(mini_zoo / n) for n in ("base", "add", "rev")], tasks=TASKS, split=SPLIT)


def eval_merged(recipe: dict, out: Path, seed: int | None) -> dict[str, dict[str, float]]:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yml").write_text(dump_recipe(parse_recipe(recipe)))
    merge_from_file(out.parent / f"{out.name}.yml", out, seed=seed, progress=False)
    report = run_eval(out, [t["name"] for t in TASKS], limit=40, split=SPLIT, subset_seed=SUBSET_SEED, as_json=True)
    return report["metrics"]


def test_worker_scores_equal_evomerge_eval_of_the_merged_directory(
    worker: FitnessWorker, mini_zoo: Path, tmp_path: Path
) -> None:
    recipe = ties(mini_zoo, weight=0.9)
    result = worker.evaluate(Candidate("ties", payload(recipe, seed=5)))
    assert result.ok, result.reason
    expected = eval_merged(recipe, tmp_path / "ties", seed=5)
    for task in TASKS:
        assert result.metrics[f"{task['name']}/exact_match"] == expected[task["name"]]["exact_match"]
        assert result.metrics[f"{task['name']}/n"] == 40
    assert result.fitness == pytest.approx(sum(t["weight"] * expected[t["name"]]["exact_match"] for t in TASKS))
    assert {"materialize", "eval", "forward"} <= set(result.timings)
    assert 0 < result.timings["forward"] < result.timings["eval"]
    # A source model scored through the worker (a one-model passthrough) equals scoring its directory.
    source = worker.evaluate(
        Candidate("add", payload({"merge_method": "passthrough", "models": [{"model": str(mini_zoo / "add")}]}))
    )
    direct = run_eval(
        mini_zoo / "add", ["toy_add", "toy_rev"], limit=40, split=SPLIT, subset_seed=SUBSET_SEED, as_json=True
    )["metrics"]
    assert source.metrics["toy_add/exact_match"] == direct["toy_add"]["exact_match"]
    # Not a vacuous equality: on its own task the add expert is far ahead of the base.
    base = worker.evaluate(
        Candidate("base", payload({"merge_method": "passthrough", "models": [{"model": str(mini_zoo / "base")}]}))
    )
    assert source.metrics["toy_add/exact_match"] >= base.metrics["toy_add/exact_match"] + 0.3


def test_worker_scores_a_layer_path_like_its_exported_model(
    worker: FitnessWorker, mini_zoo: Path, tmp_path: Path
) -> None:
    recipe = dfs_path(mini_zoo)
    result = worker.evaluate(Candidate("dfs", payload(recipe, seed=None)))
    assert result.ok, result.reason
    expected = eval_merged(recipe, tmp_path / "dfs", seed=None)
    for task in TASKS:
        # Logits differ by ~1e-4 through the norm epsilon (test_materialize); allow one flipped item.
        assert abs(result.metrics[f"{task['name']}/exact_match"] - expected[task["name"]]["exact_match"]) <= 1 / 40


def test_seeded_subsets_are_fixed_and_differ_between_seeds(worker: FitnessWorker, mini_zoo: Path) -> None:
    recipe = {"merge_method": "passthrough", "models": [{"model": str(mini_zoo / "add")}]}
    one = worker.evaluate(Candidate("a", payload(recipe, seed=None)))
    again = worker.evaluate(Candidate("b", payload(recipe, seed=None)))
    assert one.outcome()[2:] == again.outcome()[2:]
    other = [
        worker.evaluate(Candidate(f"s{s}", payload(recipe, seed=None, subset_seed=s))).metrics["toy_add/exact_match"]
        for s in range(4)
    ]
    assert len(set(other)) > 1  # 40 of 500 items: different subsets give different scores


def test_merge_errors_and_unknown_metrics_are_failures_with_reasons(worker: FitnessWorker, mini_zoo: Path) -> None:
    no_base = worker.evaluate(
        Candidate(
            "x",
            payload(
                {"merge_method": "ties", "models": [{"model": str(mini_zoo / "add"), "parameters": {"weight": 1.0}}]}
            ),
        )
    )
    assert no_base.status == "failed" and no_base.reason.startswith("merge failed: base_model")
    missing = worker.evaluate(
        Candidate("y", payload({"merge_method": "passthrough", "models": [{"model": str(mini_zoo / "nope")}]}))
    )
    assert missing.status == "failed" and "not found" in missing.reason
    metric = worker.evaluate(Candidate("z", payload(ties(mini_zoo), tasks=[{"name": "toy_add", "metric": "acc"}])))
    assert metric.status == "failed" and "toy_add/acc" in metric.reason and "exact_match" in metric.reason
    bad = worker.evaluate(Candidate("w", {"recipe": ties(mini_zoo), "split": "dev"}))
    assert bad.status == "failed" and bad.reason.startswith("bad payload")


def test_weighted_fitness_rejects_missing_and_nan_metrics() -> None:
    tasks = [TaskWeight(name="a", weight=2.0), TaskWeight(name="b", metric="acc", weight=-1.0)]
    assert weighted_fitness({"a/exact_match": 0.5, "b/acc": 0.25}, tasks) == 0.75
    with pytest.raises(ValueError, match="'b/acc' missing"):
        weighted_fitness({"a/exact_match": 0.5, "b/exact_match": 1.0}, tasks)
    with pytest.raises(ValueError, match="is nan"):
        weighted_fitness({"a/exact_match": math.nan, "b/acc": 0.0}, tasks)


# ---- the same candidates through the in-process pool and a Ray pool of two workers ----------------


def candidates(zoo: Path) -> list[Candidate]:
    out = [
        Candidate(f"ties{i}", payload(ties(zoo, weight=w, density=d), seed=i))
        for i, (w, d) in enumerate([(0.9, 0.7), (0.6, 0.4), (1.0, 0.9)])
    ]
    out.append(Candidate("dare", payload({**ties(zoo), "merge_method": "dare_ties"}, seed=3)))
    out.append(Candidate("dfs", payload(dfs_path(zoo), seed=None)))
    out.append(Candidate("broken", payload({"merge_method": "ties", "models": [{"model": str(zoo / "add")}]})))
    return out


@pytest.fixture(scope="module")
def spec(mini_zoo: Path) -> WorkerSpec:
    return WorkerSpec(
        "evomerge.workers.fitness:FitnessWorker",
        {
            "sources": [str(mini_zoo / n) for n in ("base", "add", "rev")],
            "tasks": TASKS,
            "include_paths": [],
            "split": SPLIT,
        },
    )


@pytest.fixture(scope="module")
def ray_results(ray_instance: None, spec: WorkerSpec, mini_zoo: Path) -> Iterator[dict]:
    with RayExecutor(spec, n_workers=2, penalty=-1.0, start_timeout=120.0) as pool:
        results = {r.candidate_id: r for r in pool.map_unordered(candidates(mini_zoo))}
        yield {"results": results, "workers": {r.worker for r in results.values()}}


def test_a_ray_pool_of_two_fitness_workers_equals_the_local_pool(
    ray_results: dict, spec: WorkerSpec, mini_zoo: Path
) -> None:
    with LocalExecutor(spec, penalty=-1.0, torch_threads=1) as pool:
        local = {r.candidate_id: r for r in pool.map_unordered(candidates(mini_zoo))}
    assert [cid for cid, r in local.items() if not r.ok] == ["broken"], {c: r.reason for c, r in local.items()}
    remote = ray_results["results"]
    assert set(remote) == set(local)
    for cid, result in local.items():
        assert remote[cid].outcome() == result.outcome(), cid
    assert remote["broken"].status == "failed" and remote["broken"].fitness == -1.0
    assert len(ray_results["workers"]) == 2  # both actors took work


def test_scoring_a_subset_by_swapping_docs_equals_lm_evals_samples_option(mini_zoo: Path) -> None:
    from lm_eval import evaluator

    from evomerge.io.model_loading import load_model_and_tokenizer
    from evomerge.scoring.lm_tasks import load_tasks, make_lm, metric_values, score_tasks, task_samples

    loaded = load_tasks(["toy_add", "toy_rev"], split=SPLIT)
    model, tokenizer = load_model_and_tokenizer(mini_zoo / "add")
    lm = make_lm(model, tokenizer, batch_size=64)
    samples = task_samples(loaded, {"toy_add": 30, "toy_rev": 30}, SUBSET_SEED)
    ours = score_tasks(lm, loaded, samples=samples, log_samples=True)
    theirs = evaluator.evaluate(
        lm=lm, task_dict=loaded.task_dict, samples=samples, bootstrap_iters=0, log_samples=True, verbosity="ERROR"
    )
    assert metric_values(ours) == metric_values(theirs)
    for task in ("toy_add", "toy_rev"):
        assert [s["doc"] for s in ours["samples"][task]] == [s["doc"] for s in theirs["samples"][task]]
    assert loaded.size("toy_add") == 500  # the full split is back in place afterwards


def test_memoised_process_results_equal_lm_evals_for_every_doc_and_response() -> None:
    from evomerge.scoring.lm_tasks import ResultCache, load_tasks

    task = load_tasks(["toy_add"], split=SPLIT).task_dict["tasks"]["toy_add"]
    assert isinstance(task.process_results, ResultCache)
    docs = task.dataset[task.config.test_split][:20]
    answers = [str(task.doc_to_target(doc)) for doc in docs]
    assert len(set(answers)) > 1
    for doc, answer in zip(docs, answers, strict=True):
        for response in (answer, "x" + answer, answers[0]):  # answers[0] is right for some docs only
            first = task.process_results(doc, [response])
            assert task.process_results(doc, [response]) == first == task.process_results.compute(doc, [response])
            assert first["exact_match"] == float(response == answer)
