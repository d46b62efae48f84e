"""Staged evaluation: the statistics, the race in the driver (fewer items, no item scored twice, the
generation's best never dropped) and the real lm-eval worker scoring windows of items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from search_worker import ToyFitnessWorker, make_models, write_space

from evomerge.cli.search import run_search
from evomerge.errors import EvomergeError
from evomerge.search.fidelity import Estimate, estimate, stage_windows, still_racing
from evomerge.search.run import read_journal
from evomerge.search.space import parse_space
from evomerge.workers.candidate import Candidate

TASKS = [
    {"name": "toy_add", "metric": "exact_match", "weight": 0.6, "limit": 100},
    {"name": "toy_rev", "metric": "exact_match", "weight": 0.4, "limit": 60},
]


def test_windows_cover_every_position_once():
    assert stage_windows([20, 50]) == [(0, 20), (20, 50), (50, None)]


def test_estimate_bounds_shrink_to_the_exact_value_once_every_item_is_scored():
    weights = {"a": 0.5, "b": 0.5}
    partial = estimate({"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0] * 4}, {"a": 40, "b": 40}, weights)
    assert partial.fitness == pytest.approx(0.5 * 0.75)
    assert partial.se > 0 and not partial.complete  # 0/4 on b still has a non-zero bound
    more = estimate({"a": [1.0, 0.0, 1.0, 1.0] * 5, "b": [0.0] * 20}, {"a": 40, "b": 40}, weights)
    assert more.se < partial.se
    done = estimate({"a": [1.0, 0.0] * 20, "b": [1.0] * 40}, {"a": 40, "b": 40}, weights)
    assert done.complete and done.se == 0.0 and done.fitness == pytest.approx(0.75)


def test_the_race_keeps_what_can_still_reach_the_top():
    estimates = {
        "best": Estimate(0.8, 0.05, False),
        "close": Estimate(0.75, 0.05, False),
        "far": Estimate(0.4, 0.05, False),
        "done": Estimate(0.7, 0.0, True),
    }
    assert still_racing(estimates, z=1.96, rank=1) == {"best", "close"}  # far: 0.498 < 0.702
    assert still_racing(estimates, z=1.96, rank=2) == {"best", "close"}  # bar: done's exact 0.7
    assert still_racing(estimates, z=1.96, rank=4) == {"best", "close", "far"}  # bar: 0.302
    with pytest.raises(EvomergeError, match="fidelity.stages: must be ascending"):
        parse_space(
            {"models": ["a"], "base_model": "b", "tasks": [{"name": "t"}], "ps": {}, "fidelity": {"stages": [50, 50]}}
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fidelity")
    make_models(root / "models")
    out = {}
    for name, extra in (("full", ""), ("staged", "fidelity: {stages: [15, 40]}")):
        path = write_space(
            root / f"{name}.yaml",
            f"""\
models: [models/a, models/b]
base_model: models/base
tasks: {json.dumps(TASKS)}
budget: {{max_evals: 48, popsize: 8, select_top_k: 3}}
seed: 2
worker: {{factory: "search_worker:ToyFitnessWorker"}}
ps: {{method: dare_ties, granularity: 2}}
{extra}
""",
        )
        run_search(path, root / name, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
        out[name] = root / name
    return out


def test_a_staged_run_scores_each_item_once_and_fewer_items(runs):
    records = list(read_journal(runs["staged"] / "journal.jsonl"))
    stages = {r["eval_id"]: r for r in records if r["phase"] == "stage"}
    search = [r for r in records if r["phase"] == "search"]
    assert len(search) == 48 and all(r["status"] == "ok" for r in search)
    dropped = 0
    for record in search:
        parts = [stages[i] for i in record["fidelity"]["stages"]]
        for task in TASKS:
            name, total = task["name"], task["limit"]
            indices = [i for part in parts for i, _ in part["items"][name]]
            assert len(indices) == len(set(indices)), "an item was scored twice"
            scores = [s for part in parts for _, s in part["items"][name]]
            assert record["metrics"][f"{name}/exact_match"] == pytest.approx(sum(scores) / len(scores))
            assert record["metrics"][f"{name}/n"] == len(indices)
            if record["fidelity"]["complete"]:
                assert sorted(indices) == list(range(total))  # the whole search subset, as without stages
        dropped += not record["fidelity"]["complete"]
    assert dropped > 0
    summaries = {k: json.loads((v / "summary.json").read_text()) for k, v in runs.items()}
    assert summaries["full"]["items_scored"] == 48 * 160
    assert summaries["staged"]["items_scored"] == sum(
        sum(r["metrics"][f"{t['name']}/n"] for t in TASKS) for r in stages.values()
    )
    assert summaries["staged"]["items_scored"] < summaries["full"]["items_scored"]


def test_the_race_never_drops_the_generation_best(runs):
    """Score every candidate on all items afterwards: the best of each generation finished every stage."""
    worker = ToyFitnessWorker(sources=[], tasks=TASKS)
    records = [r for r in read_journal(runs["staged"] / "journal.jsonl") if r["phase"] == "search"]
    stage0 = {r["eval_id"]: r for r in read_journal(runs["staged"] / "journal.jsonl") if r["eval_id"].endswith("/s0")}
    worker.sources = [m for r in records for m in _models(r)]
    for generation in {r["generation"] for r in records}:
        members = [r for r in records if r["generation"] == generation]
        exact = {}
        for r in members:
            payload = {**_payload(stage0[f"{r['eval_id']}/s0"]), "window": [0, None]}
            exact[r["eval_id"]] = worker.evaluate(Candidate(r["eval_id"], payload)).fitness
        best = max(members, key=lambda r: exact[r["eval_id"]])
        assert best["fidelity"]["complete"] and best["fitness"] == pytest.approx(exact[best["eval_id"]])


def _models(record: dict) -> list[str]:
    import yaml

    recipe = yaml.safe_load(record["recipe"])
    return [recipe["base_model"]] + [s["model"] for sl in recipe["slices"] for s in sl["sources"]]


def _payload(stage_record: dict) -> dict:
    """Rebuild the stage's payload from the journaled recipe (what the driver sent)."""
    import yaml

    from evomerge.search.payload import derive_seed

    return {
        "recipe": yaml.safe_load(stage_record["recipe"]),
        "seed": stage_record["seed"],
        "split": "train",
        "tasks": TASKS,
        "subset_seed": derive_seed(2, "data", "train"),
        "order_seed": derive_seed(2, "order", "train"),
    }


def test_the_lm_eval_worker_scores_windows_of_the_same_subset(mini_zoo):
    """Two windows of a real evaluation: disjoint items whose union is the limit subset, and whose
    per-item mean equals the metric of scoring that subset in one go."""
    from evomerge.workers.fitness import FitnessWorker

    tasks = [{"name": "toy_add", "metric": "exact_match", "weight": 1.0, "limit": 12}]
    worker = FitnessWorker(sources=[str(mini_zoo / "add")], tasks=tasks, split="validation")
    recipe = {"merge_method": "passthrough", "models": [{"model": str(mini_zoo / "add")}]}
    base = {"recipe": recipe, "seed": None, "tasks": tasks, "split": "validation", "subset_seed": 4}
    whole = worker.evaluate(Candidate("whole", base))
    parts = [
        worker.evaluate(Candidate(f"w{i}", {**base, "window": list(w), "order_seed": 9}))
        for i, w in enumerate(stage_windows([5]))
    ]
    assert all(p.ok for p in parts), [p.reason for p in parts]
    items = [pair for p in parts for pair in p.items["toy_add"]]
    assert [p.metrics["toy_add/n"] for p in parts] == [5, 7] and parts[0].metrics["toy_add/n_full"] == 12
    assert len({i for i, _ in items}) == 12
    from evomerge.scoring.lm_tasks import seeded_subset, task_seed

    data = Path(__file__).resolve().parents[1] / "tasks" / "data" / "toy_add_validation.jsonl"
    size = len(data.read_text().splitlines())
    assert sorted(i for i, _ in items) == seeded_subset(size, 12, task_seed(4, "toy_add"))
    assert sum(s for _, s in items) / 12 == pytest.approx(whole.metrics["toy_add/exact_match"])


def test_report_reads_a_staged_run(runs, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli.app import app

    result = CliRunner().invoke(app, ["report", str(runs["staged"]), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "fitness.png").exists()
