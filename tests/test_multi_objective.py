"""Multi-objective runs: pareto.json is the non-dominated set of the journal, `evomerge report` plots
it, `evomerge export --pick N` exports any point of it; measures (DFS path length, size) from recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from search_worker import make_models, write_space
from typer.testing import CliRunner

from evomerge.cli.app import app
from evomerge.cli.search import run_export, run_search
from evomerge.errors import EvomergeError
from evomerge.report.data import load_pareto, load_run
from evomerge.search.objectives import dominates
from evomerge.search.run import read_journal

NAMES = ("toy_add/exact_match", "toy_rev/exact_match")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mo")
    make_models(root / "models")
    return root


@pytest.fixture(scope="module")
def nsga2_run(root) -> Path:
    path = write_space(
        root / "nsga2.yaml",
        """\
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add, weight: 0.5}, {name: toy_rev, weight: 0.5}]
objectives: [{task: toy_add}, {task: toy_rev}]
budget: {max_evals: 36, popsize: 6, select_top_k: 2}
seed: 4
optimizer: {name: optuna, sampler: nsga2}
worker: {factory: "search_worker:ToyFitnessWorker"}
ps: {method: dare_ties, granularity: 2}
""",
    )
    run_search(path, root / "run", workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    return root / "run"


def search_points(run_dir: Path) -> dict[str, tuple[float, ...]]:
    """Objective vectors of the successful search evaluations, one per distinct recipe (its first)."""
    points, seen = {}, set()
    for r in read_journal(run_dir / "journal.jsonl"):
        if r["phase"] == "search" and r["status"] == "ok" and r["recipe_sha"] not in seen:
            seen.add(r["recipe_sha"])
            points[r["eval_id"]] = tuple(r["metrics"][n] for n in NAMES)
    return points


def test_pareto_json_is_the_non_dominated_set_of_the_journal(nsga2_run):
    document = json.loads((nsga2_run / "pareto.json").read_text())
    assert document["objectives"] == [{"name": n, "direction": "maximize"} for n in NAMES]
    points = search_points(nsga2_run)
    expected = {e for e, p in points.items() if not any(dominates(q, p) for q in points.values())}
    front = document["front"]
    assert {e["eval_id"] for e in front} == expected  # (the toy worker gives distinct recipes distinct points)
    assert len(front) >= 2 and document["evaluated"] == len(points)
    for entry in front:
        assert tuple(entry["objectives"][n] for n in NAMES) == points[entry["eval_id"]]
    assert load_pareto(nsga2_run / "pareto.json") == [  # what `evomerge report` reads
        {"eval_id": e["eval_id"], "objectives": e["objectives"], "recipe": e["recipe"]} for e in front
    ]
    # the optimizer really was multi-objective: the study holds two values per trial
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(nsga2_run / "study.log")))
    trials = optuna.load_study(study_name="evomerge", storage=storage).trials
    assert len(trials) == 36 and all(len(t.values) == 2 for t in trials)


def test_report_plots_the_front_and_export_picks_any_point(nsga2_run, tmp_path):
    result = CliRunner().invoke(app, ["report", str(nsga2_run), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 1000
    front = json.loads((nsga2_run / "pareto.json").read_text())["front"]
    for pick in (0, len(front) - 1):
        out = tmp_path / f"pick{pick}.yaml"
        result = CliRunner().invoke(app, ["export", str(nsga2_run), "-o", str(out), "--pick", str(pick)])
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(out.read_text()) == yaml.safe_load(front[pick]["recipe"])
    result = CliRunner().invoke(
        app, ["export", str(nsga2_run), "-o", str(tmp_path / "x.yaml"), "--pick", str(len(front))]
    )
    assert result.exit_code == 2 and f"--pick: {len(front)} is not an entry" in result.output
    assert not (tmp_path / "x.yaml").exists()


def test_export_pick_needs_a_front(root, tmp_path):
    path = write_space(
        root / "single.yaml",
        """\
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add}]
budget: {max_evals: 6, popsize: 6, select_top_k: 1}
worker: {factory: "search_worker:ToyFitnessWorker"}
ps: {method: dare_ties}
""",
    )
    run_search(path, tmp_path / "run", workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    assert not (tmp_path / "run" / "pareto.json").exists()
    with pytest.raises(EvomergeError, match="--pick: .* has no pareto.json"):
        run_export(tmp_path / "run", tmp_path / "out.yaml", merge_dir=None, pick=0, echo=lambda *_: None)


def test_ps_plus_dfs_report_and_export_use_the_dfs_stage_front(root, tmp_path):
    """PS+DFS keeps a front per stage (ps/, dfs/); report and --pick read the last stage's."""
    path = write_space(
        root / "staged.yaml",
        """\
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add, weight: 0.5}, {name: toy_rev, weight: 0.5}]
objectives: [{task: toy_add}, {task: toy_rev}]
budget: {max_evals: 12, popsize: 6, select_top_k: 1}
worker: {factory: "search_worker:ToyFitnessWorker"}
ps: {method: ties}
dfs: {repeats: 1, scales: model_pair, models: [models/b]}
""",
    )
    run = tmp_path / "run"
    run_search(path, run, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    assert not (run / "pareto.json").exists() and (run / "ps" / "pareto.json").exists()
    dfs_front = load_pareto(run / "dfs" / "pareto.json")
    assert dfs_front != load_pareto(run / "ps" / "pareto.json")
    assert load_run(run).pareto == dfs_front
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "pareto.png").exists()
    pick = len(dfs_front) - 1
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "pick.yaml"), "--pick", str(pick)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "pick.yaml").read_text()) == yaml.safe_load(dfs_front[pick]["recipe"])
    assert str(run / "dfs" / "pareto.json") in result.output


def test_dfs_path_length_and_size_measures_with_a_single_objective_optimizer(root, tmp_path):
    """pycma optimizes the fitness; the run still keeps the front of task metric vs. path length."""
    path = write_space(
        root / "dfs.yaml",
        """\
models: [models/a, models/b]
tasks: [{name: toy_add}]
objectives: [{task: toy_add}, {measure: path_length}, {measure: size}]
budget: {max_evals: 24, popsize: 8, select_top_k: 2}
worker: {factory: "search_worker:ToyFitnessWorker"}
dfs: {repeats: 1, scales: model_pair}
""",
    )
    run_search(path, tmp_path / "run", workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    document = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert [o["direction"] for o in document["objectives"]] == ["maximize", "minimize", "minimize"]
    lengths = set()
    for entry in document["front"]:
        recipe = yaml.safe_load(entry["recipe"])
        layers = sum(s["layer_range"][1] - s["layer_range"][0] for sl in recipe["slices"] for s in sl["sources"])
        assert entry["objectives"]["path_length"] == layers
        # fake Llamas: hidden 8, vocab 16; embeddings + norm + head + per layer 4 8x8 matrices and a norm
        assert entry["objectives"]["size"] == 16 * 8 * 2 + 8 + layers * (4 * 64 + 8)
        lengths.add(layers)
    assert len(lengths) >= 2  # a shorter path traded against the task metric


def test_nsga2_on_the_mini_zoo_end_to_end(mini_zoo, tmp_path):
    """Real merges, real lm-eval: an NSGA-II search over toy_add vs toy_rev, then export a front point."""
    path = write_space(
        tmp_path / "space.yaml",
        f"""\
models: [{mini_zoo}/add, {mini_zoo}/rev]
base_model: {mini_zoo}/base
tasks: [{{name: toy_add, weight: 0.5, limit: 20}}, {{name: toy_rev, weight: 0.5, limit: 20}}]
objectives: [{{task: toy_add}}, {{task: toy_rev}}]
budget: {{max_evals: 12, popsize: 6, select_top_k: 1}}
optimizer: {{name: optuna, sampler: nsga2}}
ps: {{method: task_arithmetic, genes: {{weight: [0.0, 1.5]}}}}
""",
    )
    summary = run_search(
        path, tmp_path / "run", workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None
    )
    assert summary["final"]["test"]["score"] is not None
    front = load_pareto(tmp_path / "run" / "pareto.json")
    assert front and all(set(e["objectives"]) == set(NAMES) for e in front)
    run_export(
        tmp_path / "run",
        tmp_path / "pick.yaml",
        merge_dir=tmp_path / "model",
        pick=len(front) - 1,
        echo=lambda *_: None,
    )
    assert (tmp_path / "model" / "config.json").exists()
