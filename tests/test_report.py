"""`evomerge report` on run directories written by real searches (toy fitness worker, fake models).

Every number a figure or table shows is checked against where it comes from: the journal, the
summary, the genome the recipe was decoded from (heatmap) and `path_from_recipe` (DFS path).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from search_worker import make_models, write_space
from typer.testing import CliRunner

from evomerge.cli.app import app
from evomerge.cli.search import run_search
from evomerge.errors import EvomergeError
from evomerge.io.architecture import known_architectures
from evomerge.merge.recipe import load_recipe
from evomerge.report.build import build_report
from evomerge.report.data import recipe_heatmaps, recipe_path
from evomerge.report.figures import draw_heatmaps, draw_path
from evomerge.search.run import RunDir, read_journal
from evomerge.search.space import SearchSpace, load_space_config, path_from_recipe

PS_SPACE = """\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.6}}, {{name: toy_rev, weight: 0.4, limit: 50}}]
budget: {{max_evals: {max_evals}, popsize: 6, select_top_k: 3}}
seed: 1
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{fail_above: 0.8}}}}
ps: {{method: dare_ties, granularity: 2, split_attn_mlp: true, embedding_genes: true}}
"""
DFS_SPACE = """\
models: [models/a, models/b]
tasks: [{name: toy_add}]
budget: {max_evals: 24, popsize: 8, select_top_k: 2}
worker: {factory: "search_worker:ToyFitnessWorker"}
dfs: {repeats: 2, max_path_length: 8}
"""
STAGED_SPACE = """\
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add}]
budget: {max_evals: 12, popsize: 6, select_top_k: 2}
worker: {factory: "search_worker:ToyFitnessWorker"}
ps: {method: ties}
dfs: {repeats: 1, scales: model_pair, models: [models/b]}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    make_models(root / "models")
    return root


def _search(root: Path, name: str, text: str) -> Path:
    run_dir = root / "runs" / name
    run_search(
        write_space(root / f"{name}.yaml", text),
        run_dir,
        workers=1,
        ray_address=None,
        max_evals=None,
        seed=None,
        echo=lambda *_: None,
    )
    return run_dir


@pytest.fixture(scope="module")
def ps_run(root) -> Path:
    return _search(root, "ps", PS_SPACE.format(max_evals=24))


@pytest.fixture(scope="module")
def dfs_run(root) -> Path:
    return _search(root, "dfs", DFS_SPACE)


@pytest.fixture(scope="module")
def staged_run(root) -> Path:
    return _search(root, "staged", STAGED_SPACE)


@pytest.fixture(scope="module")
def partial_run(root) -> Path:
    """A search stopped (as by Ctrl-C) after 9 of 24 evaluations: journal and best.yaml, no summary."""
    from evomerge.search.driver import Search
    from evomerge.search.entry import local_or_ray_executor, start_run

    class Stop(Exception):
        pass

    def stop_after_nine(progress, record) -> None:
        if progress.done >= 9:
            raise Stop

    space_file = write_space(root / "partial.yaml", PS_SPACE.format(max_evals=24))
    space = SearchSpace(load_space_config(space_file), root=root)
    run = RunDir(root / "runs" / "partial")
    start_run(space, run)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Stop):
        patch.setenv("EVOMERGE_TEST_WORKER_DELAY", "0.15")  # > 1 s in all: a measurable evals/hour
        Search(run, space, local_or_ray_executor(1, None), observer=stop_after_nine).run_all()
    return run.path


def journal(run_dir: Path) -> list[dict]:
    return list(read_journal(run_dir / "journal.jsonl"))


def bound_space(run_dir: Path) -> SearchSpace:
    return SearchSpace(load_space_config(run_dir / "space.yaml"), root=run_dir.resolve())


def check_files(report, names: set[str]) -> str:
    """The expected files exist, PNGs decode to real pictures, the page embeds and links each one."""
    assert {p.name for p in report.files} == names | {"index.html"}
    assert {p.name for p in report.out_dir.iterdir()} == names | {"index.html"}  # no temp files left
    page = (report.out_dir / "index.html").read_text()
    for name in names:
        image = matplotlib.image.imread(report.out_dir / name)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert float(np.std(image[..., :3])) > 0.05  # not a blank canvas
        assert base64.b64encode((report.out_dir / name).read_bytes()).decode() in page
        assert f"href='{name}'" in page
    return page


def heatmap_cells(maps) -> dict[tuple[str, str, str], float]:
    """(row, column, kind) -> value of every non-empty cell."""
    return {
        (row, column, m.kind): float(m.values[r, c])
        for m in maps
        for r, row in enumerate(m.rows)
        for c, column in enumerate(m.columns)
        if np.isfinite(m.values[r, c])
    }


def gene_cells(space: SearchSpace, genome: list[float]) -> dict[tuple[str, str, str], float]:
    """The same cells from the genes the recipe was decoded from (independent of the recipe)."""
    layout = space.layout
    return {
        (layout.labels[model] + (f" {cls}" if cls else ""), group, kind): value
        for (group, model, gene_cls, kind), value in layout.values(genome).items()
        for cls in ([gene_cls] if gene_cls or not layout.config.split_attn_mlp else ["attn", "mlp"])
    }


def test_ps_report_figures_tables_and_heatmap_values(ps_run):
    report = build_report(ps_run)
    assert report.out_dir == ps_run / "report"
    page = check_files(report, {"fitness.png", "weights.png"})
    records = journal(ps_run)
    search = [r for r in records if r["phase"] == "search"]
    summary = json.loads((ps_run / "summary.json").read_text())
    stats = report.stats
    assert stats.evaluations == len(search) == summary["evaluations"] == 24
    assert stats.failed == sum(r["status"] != "ok" for r in search) == summary["failed"] > 0
    assert stats.best_search == max(r["fitness"] for r in search if r["status"] == "ok")
    assert stats.best_select == max(r["fitness"] for r in records if r["phase"] == "select" and r["status"] == "ok")
    final = summary["final"]["test"]
    assert stats.final_test["score"] == final["score"] and stats.final_test["ci95"] == final["ci95"]
    assert {m: s["score"] for m, s in stats.sources.items()} == {
        m: e["test"]["score"] for m, e in summary["sources"].items()
    }
    for number in (final["score"], *final["ci95"], stats.best_search, stats.best_select):
        assert f"{number:.4f}" in page
    assert f"<td class='num'>{stats.failed}</td>" in page

    # the heatmap holds exactly the parameters of final.yaml, i.e. of the genome it was decoded from
    maps = recipe_heatmaps(load_recipe(ps_run / "final.yaml"))
    assert [m.kind for m in maps] == ["weight", "density"]
    assert maps[0].columns == ["embed", "L0-1", "L2-3", "head"]
    assert maps[0].rows == ["a attn", "a mlp", "b attn", "b mlp"]
    genome = next(r["genome"] for r in search if r["eval_id"] == summary["final"]["eval_id"])
    assert heatmap_cells(maps) == gene_cells(bound_space(ps_run), genome)
    figure = draw_heatmaps(maps, "t")
    assert np.array_equal(figure.axes[0].images[0].get_array().filled(np.nan), maps[0].values, equal_nan=True)


def test_dfs_report_draws_the_path_of_the_final_recipe(dfs_run):
    report = build_report(dfs_run)
    check_files(report, {"fitness.png", "path.png"})
    recipe = load_recipe(dfs_run / "final.yaml")
    steps = recipe_path(recipe)
    expected = path_from_recipe(recipe, known_architectures()["llama"].residual_outputs)
    assert [(s.model, s.layer, s.scale) for s in steps] == expected
    assert len(expected) > 2 and any(scale != 1.0 for _, _, scale in expected)
    # the path the genome selects, model by model, is the one drawn
    summary = json.loads((dfs_run / "summary.json").read_text())
    genome = next(r["genome"] for r in journal(dfs_run) if r["eval_id"] == summary["final"]["eval_id"])
    space = bound_space(dfs_run)
    refs = [s.reference for s in space.layout.sources]
    assert [(refs[s.model], s.layer) for s in space.layout.path(genome)] == [(s.model, s.layer) for s in steps]
    figure = draw_path(steps, "t")
    drawn = figure.axes[0].lines[0].get_xydata()
    assert drawn.tolist() == [[float(i), float(s.layer)] for i, s in enumerate(steps)]
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert labels == [
        f"×{s.scale:.3g}" for i, s in enumerate(steps) if i and (s.model != steps[i - 1].model or s.scale != 1.0)
    ]
    assert not recipe_heatmaps(recipe)  # passthrough has no merge weights


def test_ps_plus_dfs_report_shows_both_stages(staged_run):
    report = build_report(staged_run)
    check_files(report, {"fitness.png", "weights.png", "path.png"})
    summary = json.loads((staged_run / "summary.json").read_text())
    stage_records = [r for s in ("ps", "dfs") for r in journal(staged_run / s) if r["phase"] == "search"]
    assert report.stats.evaluations == len(stage_records) == summary["evaluations"]
    assert report.stats.final_test["score"] == summary["final"]["test"]["score"]
    # weights come from the PS stage (a whole-model `models:` recipe), the path from the final DFS recipe
    maps = recipe_heatmaps(load_recipe(staged_run / "ps" / "final.yaml"))
    assert maps[0].columns == ["all"]
    ps_summary = json.loads((staged_run / "ps" / "summary.json").read_text())
    genome = next(r["genome"] for r in journal(staged_run / "ps") if r["eval_id"] == ps_summary["final"]["eval_id"])
    assert heatmap_cells(maps) == {
        (row, "all", kind): v for (row, _, kind), v in gene_cells(bound_space(staged_run / "ps"), genome).items()
    }
    steps = recipe_path(load_recipe(staged_run / "final.yaml"))
    assert steps[0].model == str((staged_run / "ps" / "model").resolve())


def test_a_run_still_going_is_reported_from_its_journal_and_best_recipe(partial_run):
    assert not (partial_run / "summary.json").exists()
    report = build_report(partial_run)
    page = check_files(report, {"fitness.png", "weights.png"})
    search = journal(partial_run)
    assert report.stats.evaluations == len(search) == 9 and report.stats.best_select is None
    ends = [datetime.fromisoformat(r["time"]).timestamp() for r in search]
    span = max(ends) - min(end - r["seconds"] for end, r in zip(ends, search, strict=True))
    assert span >= 1.0 and report.stats.evals_per_hour == pytest.approx(9 * 3600 / span)
    assert f"{report.stats.evals_per_hour:.1f}" in page
    assert "has not finished" in page and "Final recipe vs sources" not in page
    best = max((r for r in search if r["status"] == "ok"), key=lambda r: r["fitness"])
    maps = recipe_heatmaps(load_recipe(partial_run / "best.yaml"))
    assert heatmap_cells(maps) == gene_cells(bound_space(partial_run), best["genome"])


def test_cli_writes_to_the_chosen_folder_and_plots_a_pareto_front(ps_run, tmp_path):
    """A pareto.json (issue 7's shape) gets its own figure and table."""
    records = [r for r in journal(ps_run) if r["phase"] == "search" and r["status"] == "ok"]
    names = ("toy_add/exact_match", "toy_rev/exact_match")
    points = {r["eval_id"]: tuple(r["metrics"][n] for n in names) for r in records}
    front = [
        {"eval_id": e, "objectives": dict(zip(names, p, strict=True)), "recipe": r["recipe"]}
        for r in records
        for e, p in [(r["eval_id"], points[r["eval_id"]])]
        if not any(q != p and all(a >= b for a, b in zip(q, p, strict=True)) for q in points.values())
    ]
    assert front
    (ps_run / "pareto.json").write_text(json.dumps(front))
    try:
        result = CliRunner().invoke(app, ["report", str(ps_run), "-o", str(tmp_path / "out")])
    finally:
        (ps_run / "pareto.json").unlink()
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "evaluations" in result.output
    page = (tmp_path / "out" / "index.html").read_text()
    assert "href='pareto.png'" in page
    for entry in front:
        assert f"<td>{entry['eval_id']}</td>" in page
    image = matplotlib.image.imread(tmp_path / "out" / "pareto.png")
    assert float(np.std(image[..., :3])) > 0.05


@pytest.mark.parametrize("case", ["missing", "not_a_run", "damaged_journal"])
def test_cli_refuses_what_is_not_a_run_and_writes_nothing(ps_run, tmp_path, case):
    run_dir = tmp_path / "run"
    expected = str(run_dir)
    if case == "not_a_run":
        run_dir.mkdir()
    elif case == "damaged_journal":
        run_dir.mkdir()
        for name in ("space.yaml", "journal.jsonl"):
            (run_dir / name).write_bytes((ps_run / name).read_bytes())
        with open(run_dir / "journal.jsonl", "a") as handle:
            handle.write("{not json\n")
        expected = str(run_dir / "journal.jsonl")
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and expected in result.output
    assert (sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None) == before


def test_a_run_without_evaluations_is_an_error(root, tmp_path):
    space = SearchSpace(load_space_config(write_space(root / "empty.yaml", PS_SPACE.format(max_evals=6))), root=root)
    from evomerge.search.entry import start_run

    start_run(space, RunDir(tmp_path / "run"))
    with pytest.raises(EvomergeError, match="has no evaluations yet"):
        build_report(tmp_path / "run")
    assert not (tmp_path / "run" / "report").exists()
