"""The search driver with the toy fitness worker: determinism, failures, cache, journal, resume, export."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import optuna
import pytest
import search_worker
import yaml
from search_worker import make_models, write_space
from typer.testing import CliRunner

from evomerge.cli.app import app
from evomerge.cli.search import run_export, run_resume, run_search
from evomerge.errors import EvomergeError
from evomerge.search.driver import journal_genomes
from evomerge.search.identity import space_sha
from evomerge.search.run import read_journal
from evomerge.search.space import SearchSpace, load_space_config

SPACE = """\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.6}}, {{name: toy_rev, weight: 0.4, limit: 50}}]
budget: {{max_evals: {max_evals}, popsize: 6, select_top_k: 3}}
seed: {seed}
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {kwargs}}}
ps: {{method: dare_ties, granularity: 2}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    make_models(root / "models")
    return root


def space(root: Path, name: str, *, max_evals: int = 24, seed: int = 3, **kwargs) -> Path:
    return write_space(root / f"{name}.yaml", SPACE.format(max_evals=max_evals, seed=seed, kwargs=json.dumps(kwargs)))


def search(space_path: Path, run_dir: Path, **options):
    return run_search(
        space_path,
        run_dir,
        workers=1,
        ray_address=None,
        max_evals=options.get("max_evals"),
        seed=options.get("seed"),
        echo=lambda *_: None,
    )


def journal(run_dir: Path) -> list[dict]:
    return list(read_journal(run_dir / "journal.jsonl"))


def log_ids(log: Path) -> list[str]:
    return [json.loads(line)["eval_id"] for line in log.read_text().splitlines()] if log.exists() else []


def test_a_run_writes_journal_run_file_best_final_and_summary(root, tmp_path):
    run_dir = tmp_path / "run"
    summary = search(space(root, "basic"), run_dir)
    records = journal(run_dir)
    search_records = [r for r in records if r["phase"] == "search"]
    assert len(search_records) == 24
    for key in (
        "eval_id",
        "generation",
        "genome",
        "recipe_sha",
        "seed",
        "metrics",
        "fitness",
        "status",
        "seconds",
        "worker",
        "reason",
    ):
        assert all(key in r for r in records), key
    assert {r["generation"] for r in search_records} == {0, 1, 2, 3}
    assert len({r["seed"] for r in search_records}) == 1  # one mask seed per run, stored in each recipe
    # no optimizer state: the journal is what a resume replays, run.json what it checks the space against
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",  # the run lock, empty once the run has ended
        "best.yaml",
        "final.yaml",
        "journal.jsonl",
        "run.json",
        "space.yaml",
        "summary.json",
    ]
    space_now = SearchSpace(load_space_config(run_dir / "space.yaml"), root=run_dir)
    run_file = json.loads((run_dir / "run.json").read_text())
    assert run_file["format"] == 1 and run_file["space_sha"] == space_sha(space_now)
    assert set(run_file["sources"]) == {str((root / "models" / n).resolve()) for n in ("base", "a", "b")}
    # summary.json in the shape; the final's test score is the weighted fitness on test
    assert summary["final"]["recipe"] == "final.yaml"
    test = summary["final"]["test"]
    assert test["ci95"][0] < test["score"] < test["ci95"][1]
    assert test["score"] == pytest.approx(
        0.6 * test["metrics"]["toy_add/exact_match"] + 0.4 * test["metrics"]["toy_rev/exact_match"]
    )
    assert set(summary["sources"]) == {str((root / "models" / n).resolve()) for n in ("base", "a", "b")}
    assert summary["evaluations"] == 24 and summary["failed"] == 0
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    final = yaml.safe_load((run_dir / "final.yaml").read_text())
    top = max(search_records, key=lambda r: r["fitness"])
    assert yaml.safe_load((run_dir / "best.yaml").read_text()) == yaml.safe_load(top["recipe"])
    assert final["merge_method"] == "dare_ties" and final["seed"] == search_records[0]["seed"]
    # the search climbed: the last generation beats the first on average
    mean = [sum(r["fitness"] for r in search_records if r["generation"] == g) / 6 for g in (0, 3)]
    assert mean[1] > mean[0]


def test_same_seed_same_genomes_other_seed_other_genomes(root, tmp_path):
    path = space(root, "seeded")
    search(path, tmp_path / "one")
    search(path, tmp_path / "two")
    search(path, tmp_path / "three", seed=4)
    one, two, three = (journal_genomes(journal(tmp_path / n)) for n in ("one", "two", "three"))
    assert one == two
    assert [g for _, g, _ in one] != [g for _, g, _ in three]
    assert (tmp_path / "one" / "final.yaml").read_text() == (tmp_path / "two" / "final.yaml").read_text()


def test_failed_candidates_get_the_penalty_and_the_search_goes_on(root, tmp_path):
    run_dir = tmp_path / "run"
    summary = search(space(root, "failing", fail_above=0.55), run_dir)
    failed = [r for r in journal(run_dir) if r["status"] == "failed"]
    assert failed and summary["failed"] == len([r for r in failed if r["phase"] == "search"])
    assert all(r["fitness"] == 0.0 and "weight above 0.55" in r["reason"] for r in failed)
    assert summary["final"]["test"]["score"] is not None


def test_identical_recipes_are_evaluated_once(root, tmp_path):
    """DFS genomes collapse onto few paths: each distinct recipe reaches the worker once."""
    log = tmp_path / "worker.log"
    path = write_space(
        root / "dfs.yaml",
        f"""\
models: [models/a, models/b]
tasks: [{{name: toy_add}}]
budget: {{max_evals: 40, popsize: 8, select_top_k: 2}}
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "{log}"}}}}
dfs: {{repeats: 1, scales: model_pair, scale_bounds: [0.999999, 1.000001], max_path_length: 3}}
""",
    )
    run_dir = tmp_path / "run"
    search(path, run_dir)
    records = journal(run_dir)
    keys = {r["cache_key"] for r in records if r["cache_key"]}
    assert len(log_ids(log)) == len(keys) < len([r for r in records if r["cache_key"]])
    by_id = {r["eval_id"]: r for r in records}
    hits = [r for r in records if r["cached_from"]]
    assert hits
    for hit in hits:
        source = by_id[hit["cached_from"]]
        assert (hit["cache_key"], hit["fitness"], hit["metrics"]) == (
            source["cache_key"],
            source["fitness"],
            source["metrics"],
        )
        assert hit["worker"] is None and hit["eval_id"] not in log_ids(log)


def test_resume_extends_a_run_exactly_and_recomputes_nothing(root, tmp_path):
    log = tmp_path / "worker.log"
    path = space(root, "extend", log=str(log))
    search(path, tmp_path / "straight", max_evals=36)
    straight = journal_genomes(journal(tmp_path / "straight"))
    log.unlink()

    search(path, tmp_path / "split", max_evals=18)
    first = {r["eval_id"] for r in journal(tmp_path / "split")}
    before = len(log_ids(log))
    run_resume(tmp_path / "split", max_evals=36, workers=1, ray_address=None, echo=lambda *_: None)
    assert journal_genomes(journal(tmp_path / "split")) == straight
    assert not set(log_ids(log)[before:]) & first
    assert (tmp_path / "split" / "final.yaml").read_text() == (tmp_path / "straight" / "final.yaml").read_text()
    space_yaml = yaml.safe_load((tmp_path / "split" / "space.yaml").read_text())
    assert space_yaml["budget"]["max_evals"] == 36


def test_resume_of_a_finished_run_evaluates_nothing(root, tmp_path):
    log = tmp_path / "worker.log"
    search(space(root, "finished", log=str(log)), tmp_path / "run", max_evals=12)
    count = len(log_ids(log))
    lines = (tmp_path / "run" / "journal.jsonl").read_text()
    summary = run_resume(tmp_path / "run", max_evals=None, workers=1, ray_address=None, echo=lambda *_: None)
    assert len(log_ids(log)) == count and (tmp_path / "run" / "journal.jsonl").read_text() == lines
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_torn_last_journal_line_is_dropped_on_resume(root, tmp_path):
    run_dir = tmp_path / "run"
    search(space(root, "torn"), run_dir, max_evals=12)
    records = journal(run_dir)
    with open(run_dir / "journal.jsonl", "a") as handle:
        handle.write('{"eval_id": "g0002-000", "phase": "sea')
    run_resume(run_dir, max_evals=18, workers=1, ray_address=None, echo=lambda *_: None)
    text = (run_dir / "journal.jsonl").read_text()
    assert '"phase": "sea\n' not in text and text.endswith("\n")
    assert [r["eval_id"] for r in journal(run_dir)][: len(records)] == [r["eval_id"] for r in records]


def test_resume_refuses_a_changed_space(root, tmp_path):
    run_dir = tmp_path / "run"
    search(space(root, "changed"), run_dir, max_evals=6)
    text = (run_dir / "space.yaml").read_text().replace("granularity: 2", "granularity: 1")
    (run_dir / "space.yaml").write_text(text)
    with pytest.raises(EvomergeError, match="the search space changed since the run started; only budget.max_evals"):
        run_resume(run_dir, max_evals=12, workers=1, ray_address=None, echo=lambda *_: None)


class Planted:
    """Unpickling this creates `marker`: a crafted optimizer.pkl that would run code on resume if loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_resume_unpickles_nothing_and_rebuilds_the_optuna_study_from_the_journal(root, tmp_path):
    """An old or crafted optimizer.pkl is never loaded, a garbage study.log never read; two resumes later the
    run equals an uninterrupted one and study.log holds one study with every search evaluation."""
    text = (
        space(root, "planted").read_text() + "optimizer: {name: optuna, sampler: tpe, options: {n_startup_trials: 6}}\n"
    )
    path = write_space(root / "planted.yaml", text)
    search(path, tmp_path / "straight", max_evals=18)
    run_dir = tmp_path / "run"
    search(path, run_dir, max_evals=12)
    marker = tmp_path / "pickle-was-loaded"
    (run_dir / "optimizer.pkl").write_bytes(pickle.dumps(Planted(marker)))
    (run_dir / "study.log").write_bytes(b"\x80 not an optuna journal\n{")
    for _ in range(2):
        run_resume(run_dir, max_evals=18, workers=1, ray_address=None, echo=lambda *_: None)
    assert not marker.exists()
    assert journal_genomes(journal(run_dir)) == journal_genomes(journal(tmp_path / "straight"))
    assert (run_dir / "final.yaml").read_text() == (tmp_path / "straight" / "final.yaml").read_text()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "study.log")))
    summaries = optuna.get_all_study_summaries(storage)
    assert [(s.study_name, s.n_trials) for s in summaries] == [("evomerge", 18)]
    trials = optuna.load_study(study_name="evomerge", storage=storage).trials
    assert [list(t.params.values()) for t in trials] == [g for _, g, _ in journal_genomes(journal(run_dir))]


def test_resume_refuses_a_journal_the_optimizer_no_longer_reproduces(root, tmp_path):
    """A journaled genome the fresh optimizer does not ask again (here: edited) ends the resume with one line and
    exit status 2, before anything is evaluated or journaled."""
    run_dir = tmp_path / "run"
    search(space(root, "edited"), run_dir, max_evals=18)
    records = journal(run_dir)
    for record in records:
        if record["eval_id"] in ("g0001-002", "g0001-004"):
            record["genome"][0] += 1e-12
    (run_dir / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # the console may wrap the one line
    assert f"{run_dir}: the optimizer no longer reproduces the run" in message
    assert "g0001-002" in message and "g0001-004" not in message
    assert journal(run_dir) == records


def test_search_refuses_an_existing_run_and_resume_a_missing_one(root, tmp_path):
    run_dir = tmp_path / "run"
    search(space(root, "exists"), run_dir, max_evals=6)
    with pytest.raises(EvomergeError, match="already holds a run; use `evomerge resume"):
        search(space(root, "exists"), run_dir, max_evals=6)
    with pytest.raises(EvomergeError, match="is not a run directory"):
        run_resume(tmp_path / "nothing", max_evals=None, workers=1, ray_address=None, echo=lambda *_: None)


def test_export_writes_the_final_recipe_and_merges_it(root, tmp_path):
    run_dir = tmp_path / "run"
    search(space(root, "export"), run_dir, max_evals=6)
    out = tmp_path / "recipe.yaml"
    run_export(run_dir, out, merge_dir=tmp_path / "merged", echo=lambda *_: None)
    assert out.read_text() == (run_dir / "final.yaml").read_text()
    assert (tmp_path / "merged" / "config.json").exists()
    assert list((tmp_path / "merged").glob("*.safetensors"))


def test_ps_plus_dfs_runs_two_stages_and_resumes_without_recomputing(root, tmp_path):
    log = tmp_path / "worker.log"
    path = write_space(
        root / "psdfs.yaml",
        f"""\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add}}]
budget: {{max_evals: 12, select_top_k: 2}}
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "{log}"}}}}
ps: {{method: ties}}
dfs: {{repeats: 1, scales: model_pair, models: [models/b]}}
""",
    )
    run_dir = tmp_path / "run"
    summary = search(path, run_dir)
    ps_model = (run_dir / "ps" / "model").resolve()
    assert (ps_model / "config.json").exists()
    final = yaml.safe_load((run_dir / "final.yaml").read_text())
    assert final["merge_method"] == "passthrough"
    assert final["slices"][0]["sources"][0]["model"] == str(ps_model)  # the PS result is the anchor
    assert (run_dir / "final.yaml").read_text() == (run_dir / "dfs" / "final.yaml").read_text()
    assert summary["kind"] == "ps+dfs" and summary["sources"][str(ps_model)]["role"] == "ps"
    stage_evals = [json.loads((run_dir / s / "summary.json").read_text())["evaluations"] for s in ("ps", "dfs")]
    assert summary["evaluations"] == sum(stage_evals)
    count = len(log_ids(log))
    assert run_resume(run_dir, max_evals=None, workers=1, ray_address=None, echo=lambda *_: None) == summary
    assert len(log_ids(log)) == count


def test_a_broken_worker_factory_is_a_one_line_error_and_the_run_stays_resumable(root, tmp_path, monkeypatch):
    text = space(root, "ok").read_text().replace("ToyFitnessWorker", "UnbuildableWorker")
    path = write_space(root / "broken.yaml", text)
    with pytest.raises(EvomergeError, match="worker.factory: cannot build 'search_worker:UnbuildableWorker'"):
        search(path, tmp_path / "run", max_evals=6)
    monkeypatch.setattr(search_worker, "UnbuildableWorker", search_worker.ToyFitnessWorker)  # the fix
    run_resume(tmp_path / "run", max_evals=None, workers=1, ray_address=None, echo=lambda *_: None)
    search(space(root, "ok"), tmp_path / "straight", max_evals=6)
    assert journal_genomes(journal(tmp_path / "run")) == journal_genomes(journal(tmp_path / "straight"))


@pytest.mark.slow
def test_a_ray_pool_of_two_gives_the_same_run_as_one_local_worker(root, tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    path = space(root, "ray")
    search(path, tmp_path / "local", max_evals=12)
    run_search(path, tmp_path / "ray", workers=2, ray_address=None, max_evals=12, seed=None, echo=lambda *_: None)
    assert journal_genomes(journal(tmp_path / "ray")) == journal_genomes(journal(tmp_path / "local"))
    assert (tmp_path / "ray" / "final.yaml").read_text() == (tmp_path / "local" / "final.yaml").read_text()


def test_dfs_selection_also_offers_the_anchor_alone(root, tmp_path):
    """The x0 path (the anchor model alone) competes in the selection, so a DFS run never ends on a
    path that is worse on the selection split than not re-routing at all."""
    path = write_space(
        root / "dfs_incumbent.yaml",
        """\
models: [models/a, models/b]
tasks: [{name: toy_add}]
budget: {max_evals: 16, popsize: 8, select_top_k: 2}
worker: {factory: "search_worker:ToyFitnessWorker"}
dfs: {repeats: 1, scales: model_pair}
""",
    )
    run_dir = tmp_path / "run"
    summary = search(path, run_dir)
    records = journal(run_dir)
    offered = [r for r in records if r["phase"] == "select" and r["label"] == "incumbent"]
    assert [r["split"] for r in offered] == ["train", "validation"]
    anchor_alone = yaml.safe_load(offered[0]["recipe"])
    assert [s["sources"][0]["model"] for s in anchor_alone["slices"]] == [str((root / "models/a").resolve())]
    chosen = [r for r in records if r["phase"] == "select" and r["split"] == "validation"]
    assert summary["final"]["validation"]["score"] == max(r["fitness"] for r in chosen)
