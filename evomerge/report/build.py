"""`evomerge report runs/NAME`: figures, one HTML page and a terminal table for a run.

Writes into runs/NAME/report/ (or `-o DIR`):

    fitness.png   each search evaluation, failures marked, best so far, per-generation mean and band
    weights.png   per-layer heatmap of the chosen recipe's PS parameters (weight, density, ...)
    path.png      the DFS inference path: the layers taken, step by step, with transition scales
    pareto.png    the Pareto front, when the run has a pareto.json (multi-objective searches)
    index.html    everything above on one self-contained page, with the summary tables

A run still going (no summary.json) gets a report of what is journaled so far, using best.yaml.
Everything is computed before anything is written, and each file is replaced atomically, so a
failing report leaves the folder as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.report.data import (
    RunData,
    RunStats,
    fitness_series,
    front_file,
    load_chosen_recipe,
    load_run,
    recipe_heatmaps,
    recipe_path,
    run_stats,
)
from evomerge.search.run import atomic_write

REPORT_DIR = "report"
HTML_FILE = "index.html"


@dataclass
class Report:
    out_dir: Path
    stats: RunStats
    tables: list[tuple[str, list[str], list[list[str]]]]
    files: list[Path] = field(default_factory=list)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Read the run, draw every figure that applies, write PNGs + index.html; return what was shown."""
    from evomerge.report.figures import draw_fitness, draw_heatmaps, draw_pareto, draw_path, to_png
    from evomerge.report.html import Figure, render_page

    run = load_run(run_dir)
    stats = run_stats(run)
    figures: list[Figure] = []
    series = [(stage.name, fitness_series(stage.records)) for stage in run.stages if stage.search_records]
    figures.append(
        Figure(
            "fitness.png",
            "Fitness over evaluations",
            f"search-split fitness of every evaluation ({stats.evaluations}, {stats.failed} failed)",
            to_png(draw_fitness(series, stats.splits.get("search", "search"))),
        )
    )
    ps_file = _ps_recipe_file(run)
    maps = recipe_heatmaps(load_chosen_recipe(ps_file)) if ps_file else []
    if maps:
        figures.append(
            Figure(
                "weights.png",
                "Per-layer merge parameters",
                f"read from {_relative(ps_file, run)}",
                to_png(draw_heatmaps(maps, f"{_relative(ps_file, run)}: per-layer parameters")),
            )
        )
    path_file = run.recipe_file
    steps = recipe_path(load_chosen_recipe(path_file)) if path_file else []
    if steps:
        figures.append(
            Figure(
                "path.png",
                "DFS inference path",
                f"{len(steps)} layers, read from {_relative(path_file, run)}",
                to_png(
                    draw_path(
                        steps,
                        f"{_relative(path_file, run)}: layers in the order they run",
                        _names_inside(run, [s.model for s in steps]),
                    )
                ),
            )
        )
    if run.pareto:
        figures.append(
            Figure(
                "pareto.png",
                "Pareto front",
                f"{len(run.pareto)} non-dominated evaluations",
                to_png(draw_pareto(run.pareto, _objective_background(run))),
            )
        )
    tables = summary_tables(run, stats)
    notes = [f"run {run.path} ({run.kind})"]
    if run.summary is None:
        notes.append(
            "The run has not finished (no summary.json yet): figures show the evaluations journaled so "
            "far and the best recipe by search fitness (best.yaml)."
        )
    page = render_page(f"evomerge report: {run.path.name}", notes, tables, figures)

    out = Path(out_dir) if out_dir is not None else run.path / REPORT_DIR
    report = Report(out, stats, tables)
    for figure in figures:
        atomic_write(out / figure.file, figure.png)
        report.files.append(out / figure.file)
    atomic_write(out / HTML_FILE, page)
    report.files.append(out / HTML_FILE)
    return report


def _ps_recipe_file(run: RunData) -> Path | None:
    """The recipe whose PS parameters are drawn: the PS stage's of a PS+DFS run, else the run's own."""
    for stage in run.stages:
        if stage.name == "ps":
            return stage.recipe_file
    return run.recipe_file


def _relative(path: Path | None, run: RunData) -> str:
    assert path is not None
    try:
        return str(path.relative_to(run.path))
    except ValueError:
        return str(path)


def _names_inside(run: RunData, models: list[str]) -> dict[str, str]:
    """Models the run made itself (a PS+DFS run's ps/model) are named by their path inside the run."""
    inside = {}
    for model in models:
        try:
            inside[model] = str(Path(model).relative_to(run.path.resolve()))
        except ValueError:
            pass
    return inside


def _objective_background(run: RunData) -> list[dict[str, float]] | None:
    """Every search evaluation's objectives, when the front's objective names are journaled metrics."""
    names = list(run.pareto[0]["objectives"]) if run.pareto else []
    front = front_file(run.path)
    stages = [s for s in run.stages if front is not None and s.path == front.parent] or run.stages  # its stage
    points = [
        {n: r["metrics"][n] for n in names}
        for stage in stages
        for r in stage.search_records
        if r["status"] == "ok" and all(n in r["metrics"] for n in names)
    ]
    return points or None


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_tables(run: RunData, stats: RunStats) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, rows): the search statistics, the final recipe against its sources, the front."""
    split = stats.splits
    search_rows = [
        ["status", "finished" if run.summary is not None else "running or stopped (no summary.json yet)"],
        ["kind", run.kind],
        ["evaluations", str(stats.evaluations)],
        ["failed", str(stats.failed)],
        ["evaluations / hour", _number(stats.evals_per_hour, 1)],
        [f"best fitness, search split ({split.get('search')})", _number(stats.best_search)],
        [f"best fitness, selection split ({split.get('select')})", _number(stats.best_select)],
    ]
    tables = [("Search", ["", "value"], search_rows)]
    if run.summary is not None:
        report = split.get("report")
        final = stats.final_test or {}
        ci = final.get("ci95")
        rows = [["final.yaml", "final", _number(final.get("score")), f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"]]
        best_source = max(
            (s["score"] for s in stats.sources.values() if s["score"] is not None and s["role"] == "source"),
            default=None,
        )
        for model, entry in stats.sources.items():
            rows.append([model, entry["role"], _number(entry["score"]), "-"])
        if final.get("score") is not None and best_source is not None:
            rows.append(["final - best source model", "", _number(final["score"] - best_source), ""])
        tables.append((f"Final recipe vs sources ({report} split)", ["model", "role", "score", "95% CI"], rows))
    if run.pareto:
        names = list(run.pareto[0]["objectives"])
        tables.append(
            (
                "Pareto front",
                ["eval_id", *names],
                [[str(e["eval_id"]), *(_number(e["objectives"].get(n)) for n in names)] for e in run.pareto],
            )
        )
    return tables


def print_report(report: Report, console: Any) -> None:
    """The tables on the terminal (rich), then where the files went."""
    from rich.table import Table

    for heading, header, rows in report.tables:
        table = Table(title=heading, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(
        f"wrote {len(report.files)} files to {report.out_dir}: " + ", ".join(p.name for p in report.files),
        highlight=False,
        soft_wrap=True,
    )
