"""What `evomerge report` draws, read from a run directory without matplotlib.

Everything here is plain data (lists, dataclasses, numpy arrays), so tests can compare it with
the journal, summary.json and the recipes directly, and the figures stay thin drawing code.
Recipes are read as recipes (not through the search space's genes), so the heatmap and the path
work for any exported mergekit recipe, not only for ones this run decoded.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.io.architecture import known_architectures
from evomerge.merge.recipe import FilteredValue, ParameterSetting, Recipe, as_number, evaluate_setting, load_recipe
from evomerge.search.run import BEST_FILE, FINAL_FILE, PARETO_FILE, SPACE_FILE, SUMMARY_FILE, RunDir, read_journal
from evomerge.search.space.config import load_space_config
from evomerge.search.space.dfs import path_from_recipe
from evomerge.search.space.ps import model_labels

STAGES = ("ps", "dfs")  # sub-runs of a PS+DFS run, in the order they ran (evomerge/search/entry.py)


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One search (a plain run, or one stage of PS+DFS): its journal and its chosen recipe."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    recipe_file: Path | None  # final.yaml, else best.yaml (a run still going), else None

    @property
    def search_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("phase", "search") == "search"]


@dataclass
class RunData:
    path: Path
    kind: str
    stages: list[Stage]
    summary: dict[str, Any] | None  # None while the run has not finished
    pareto: list[dict[str, Any]] | None = None
    tasks: list[Any] = field(default_factory=list)

    @property
    def recipe_file(self) -> Path | None:
        """The run's chosen recipe: the top-level final.yaml, else the last stage's best so far."""
        final = self.path / FINAL_FILE
        return final if final.exists() else self.stages[-1].recipe_file


def load_run(path: str | Path) -> RunData:
    """Read a run directory; a one-line EvomergeError naming `path` when it is not a usable run."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise EvomergeError(f"run: {run.path} does not exist or is not a folder")
    run.require()
    config = load_space_config(run.space_file)
    staged = config.kind == "ps+dfs"
    stage_dirs = (
        [(name, run.path / name) for name in STAGES if (run.path / name / SPACE_FILE).exists()]
        if staged
        else [("search", run.path)]
    )
    stages = [
        Stage(name, folder, list(read_journal(folder / "journal.jsonl")), _chosen_recipe(folder))
        for name, folder in stage_dirs
    ]
    if not any(stage.search_records for stage in stages):
        raise EvomergeError(f"run: {run.path} has no evaluations yet; nothing to report")
    summary_file = run.file(SUMMARY_FILE)
    summary = _read_json(summary_file) if summary_file.exists() else None
    pareto_file = front_file(run.path)
    pareto = load_pareto(pareto_file) if pareto_file is not None else None
    return RunData(run.path, config.kind, stages, summary, pareto, list(config.tasks))


def front_file(path: Path) -> Path | None:
    """The run's pareto.json: the top-level one, else (PS+DFS keeps one per stage) the last stage's."""
    for folder in (Path(path), *(Path(path) / name for name in reversed(STAGES))):
        if (folder / PARETO_FILE).exists():
            return folder / PARETO_FILE
    return None


def _chosen_recipe(folder: Path) -> Path | None:
    for name in (FINAL_FILE, BEST_FILE):
        if (folder / name).exists():
            return folder / name
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvomergeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_pareto(path: Path) -> list[dict[str, Any]]:
    return pareto_entries(_read_json(path), path)


def pareto_entries(data: Any, path: Path) -> list[dict[str, Any]]:
    """The front as a list of {eval_id, objectives: {name: value}, recipe}; a bare list or {"front": [...]}.

    Objectives given as a list are named objective_0, objective_1, ... ."""
    entries = data.get("front", data.get("entries")) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise EvomergeError(f"{path}: expected a list of front entries (eval_id, objectives, recipe)")
    out = []
    for i, entry in enumerate(entries):
        objectives = entry.get("objectives") if isinstance(entry, dict) else None
        if isinstance(objectives, list):
            objectives = {f"objective_{k}": v for k, v in enumerate(objectives)}
        if not isinstance(objectives, dict) or not objectives:
            raise EvomergeError(f"{path}: entry {i} has no objectives")
        out.append(
            {
                "eval_id": entry.get("eval_id"),
                "objectives": {k: float(v) for k, v in objectives.items()},
                "recipe": entry.get("recipe"),
            }
        )
    return out


# -- (1) fitness over evaluations -------------------------------------------------------------------


@dataclass
class FitnessSeries:
    """Search-phase evaluations in journal order (x = 1, 2, ...), and per-generation statistics."""

    x: np.ndarray
    fitness: np.ndarray
    failed: np.ndarray  # bool
    best_so_far: np.ndarray  # best successful fitness up to each x (nan before the first success)
    generations: list[int]
    generation_x: np.ndarray  # mean x of each generation's evaluations
    generation_mean: np.ndarray  # over successful evaluations (nan if none)
    generation_low: np.ndarray  # mean - std, clipped to the generation's min
    generation_high: np.ndarray


def fitness_series(records: Sequence[dict[str, Any]]) -> FitnessSeries:
    search = [r for r in records if r.get("phase", "search") == "search"]
    fitness = np.array([float(r["fitness"]) for r in search])
    failed = np.array([r["status"] != "ok" for r in search], dtype=bool)
    ok_values = np.where(failed, -np.inf, fitness)
    best = np.maximum.accumulate(ok_values) if len(search) else np.array([])
    best = np.where(np.isfinite(best), best, np.nan)
    x = np.arange(1, len(search) + 1, dtype=float)
    gens = sorted({int(r["generation"]) for r in search})
    gx, mean, low, high = [], [], [], []
    for g in gens:
        members = np.array([r["generation"] == g for r in search])
        values = fitness[members & ~failed]
        gx.append(float(x[members].mean()))
        if values.size:
            m, s = float(values.mean()), float(values.std())
            mean.append(m)
            low.append(max(m - s, float(values.min())))
            high.append(min(m + s, float(values.max())))
        else:
            mean.append(math.nan)
            low.append(math.nan)
            high.append(math.nan)
    return FitnessSeries(x, fitness, failed, best, gens, np.array(gx), np.array(mean), np.array(low), np.array(high))


# -- (2) PS heatmap from a recipe -------------------------------------------------------------------

# Filters that name embeddings / the head, in any family's naming.
_PRE = tuple(dict.fromkeys(p for arch in known_architectures().values() for p in arch.pre_prefixes))
_POST = tuple(dict.fromkeys(p for arch in known_architectures().values() for p in arch.post_prefixes))


@dataclass
class Heatmap:
    """One parameter kind (weight, density, ...): rows = source model (x tensor filter), columns =
    layer groups; nan where a source has no value for that cell."""

    kind: str
    rows: list[str]
    columns: list[str]
    values: np.ndarray


@dataclass(frozen=True)
class _Column:
    label: str
    slice_index: int
    t: float  # position inside the slice, as the merge planner interpolates gradients
    layer: int | None  # an output layer index (None for embeddings / head)
    edge: str | None = None  # pre | post


def recipe_heatmaps(recipe: Recipe) -> list[Heatmap]:
    """Per-source numeric parameters of a merge recipe, cell by cell as the merge would apply them.

    Columns: one per slice (`L0-1`), or per layer inside a slice with a gradient; a `models:` recipe
    is one column `all` (gradients: one column per gradient point). Filters on embeddings and
    head add `embed` / `head` columns; other filters (attn, mlp, ...) split a source's row."""
    if recipe.merge_method == "passthrough":
        return []
    slices = recipe.output_slices()
    settings = [(si, src.model, src.parameters or {}) for si, s in enumerate(slices) for src in s.sources]
    kinds = _numeric_kinds(p for _, _, p in settings)
    if not kinds:
        return []
    filters = [f for _, _, params in settings for v in params.values() for f in _filters(v)]
    edge_filters = {
        "pre": _first(f for f in filters if f.startswith(_PRE)),
        "post": _first(f for f in filters if f.startswith(_POST)),
    }
    row_filters = list(dict.fromkeys(f for f in filters if not f.startswith(_PRE + _POST)))
    columns = _columns(recipe, slices, settings, edge_filters)
    models = list(dict.fromkeys(m for _, m, p in settings if any(k in p for k in kinds)))
    labels = dict(zip(models, model_labels(models), strict=True))
    rows = [(m, f) for m in models for f in (row_filters or [None])]
    maps = []
    for kind in kinds:
        values = np.full((len(rows), len(columns)), np.nan)
        for si, model, params in settings:
            if kind not in params:
                continue
            for ri, (row_model, row_filter) in enumerate(rows):
                if row_model != model:
                    continue
                for ci, column in enumerate(columns):
                    if column.slice_index == si:
                        value = _cell(params[kind], column, row_filter, edge_filters)
                        if value is not None:
                            values[ri, ci] = value
        maps.append(
            Heatmap(kind, [labels[m] + (f" {f}" if f else "") for m, f in rows], [c.label for c in columns], values)
        )
    return maps


def _numeric_kinds(all_params: Any) -> list[str]:
    kinds: list[str] = []
    for params in all_params:
        for name, setting in params.items():
            if name not in kinds and _scalars(setting) and all(as_number(v) is not None for v in _scalars(setting)):
                kinds.append(name)
    preferred = [k for k in ("weight", "density") if k in kinds]
    return preferred + [k for k in kinds if k not in preferred]


def _scalars(setting: ParameterSetting) -> list[Any]:
    if isinstance(setting, FilteredValue):
        return _scalars(setting.value)  # type: ignore[arg-type]
    if isinstance(setting, list):
        return [x for item in setting for x in _scalars(item)]
    return [setting]


def _filters(setting: ParameterSetting) -> list[str]:
    items = setting if isinstance(setting, list) else [setting]
    return [i.filter for i in items if isinstance(i, FilteredValue) and i.filter not in (None, "*")]


def _first(values: Any) -> str | None:
    return next(iter(values), None)


def _gradient_points(setting: ParameterSetting) -> int:
    """How many points a gradient has (1 for scalars and filtered scalars)."""
    if isinstance(setting, FilteredValue):
        return _gradient_points(setting.value)  # type: ignore[arg-type]
    if isinstance(setting, list):
        if setting and all(isinstance(i, FilteredValue) for i in setting):
            return max(_gradient_points(i) for i in setting)
        return len(setting)
    return 1


def _columns(recipe: Recipe, slices: list, settings: list, edge_filters: dict[str, str | None]) -> list[_Column]:
    points = {
        si: max([_gradient_points(v) for s, _, p in settings if s == si for v in p.values()] or [1])
        for si in range(len(slices))
    }
    columns: list[_Column] = []
    if edge_filters["pre"]:
        columns.append(_Column("embed", 0, 0.0, None, "pre"))
    if recipe.slices is None:  # models: one slice over the whole model; gradient points as columns
        n = points[0]
        columns += (
            [_Column("all", 0, 1.0, 0)]
            if n == 1
            else [_Column(f"t={k / (n - 1):.2f}", 0, k / (n - 1), 0) for k in range(n)]
        )
    else:
        layer = 0
        for si, s in enumerate(slices):
            start, end = s.sources[0].layer_range
            length = end - start
            if points[si] == 1:
                label = f"L{layer}" if length == 1 else f"L{layer}-{layer + length - 1}"
                columns.append(_Column(label, si, 1.0 if length == 1 else 0.0, layer))
            else:
                columns += [
                    _Column(f"L{layer + k}", si, k / (length - 1) if length > 1 else 1.0, layer + k)
                    for k in range(length)
                ]
            layer += length
    if edge_filters["post"]:
        columns.append(_Column("head", len(slices) - 1, 0.0, None, "post"))
    return columns


def _cell(
    setting: ParameterSetting, column: _Column, row_filter: str | None, edge_filters: dict[str, str | None]
) -> float | None:
    """The value the merge gives one tensor of this row and column (first matching filter wins)."""
    if column.edge is not None:
        probe = f"{edge_filters[column.edge]}weight"
    else:
        probe = f"model.layers.{column.layer}.{row_filter or 'tensor'}.weight"
    return as_number(evaluate_setting(setting, probe, column.t))


# -- (3) the DFS path -------------------------------------------------------------------------------


@dataclass
class PathStep:
    """One layer on the inference path; `scale` multiplies the hidden state entering it."""

    model: str
    layer: int
    scale: float


def recipe_path(recipe: Recipe) -> list[PathStep]:
    """The layer sequence of a passthrough recipe (empty for any other merge method).

    The folded transition scales sit on filtered `scale` parameters of the output projections;
    the filter found in the recipe is the probe, so this needs no model files."""
    if recipe.merge_method != "passthrough" or not recipe.slices:
        return []
    filters = [f for s in recipe.slices for src in s.sources for f in _filters((src.parameters or {}).get("scale", []))]
    steps = path_from_recipe(recipe, [filters[0] if filters else "o_proj"])
    return [PathStep(model, layer, scale) for model, layer, scale in steps]


def load_chosen_recipe(path: Path | None) -> Recipe | None:
    return load_recipe(path) if path is not None else None


# -- (4) the summary table --------------------------------------------------------------------------


@dataclass
class RunStats:
    evaluations: int
    failed: int
    evals_per_hour: float | None  # None when the journal spans under a second
    best_search: float | None
    best_select: float | None
    splits: dict[str, str]
    final_test: dict[str, Any] | None  # summary["final"][report split]
    sources: dict[str, dict[str, Any]]  # model -> {"role", "score"}


def run_stats(run: RunData) -> RunStats:
    searches = [r for stage in run.stages for r in stage.search_records]
    selects = [r for stage in run.stages for r in stage.records if r.get("phase") == "select"]
    ok_search = [r["fitness"] for r in searches if r["status"] == "ok"]
    ok_select = [r["fitness"] for r in selects if r["status"] == "ok"]
    summary = run.summary or {}
    splits = summary.get("splits") or {"search": "search", "select": "select", "report": "report"}
    final = (summary.get("final") or {}).get(splits.get("report", "report"))
    sources = {
        model: {
            "role": entry.get("role", "source"),
            "score": (entry.get(splits.get("report", "report")) or {}).get("score"),
        }
        for model, entry in (summary.get("sources") or {}).items()
    }
    return RunStats(
        len(searches),
        sum(r["status"] != "ok" for r in searches),
        evals_per_hour(searches),
        max(ok_search, default=None),
        max(ok_select, default=None),
        splits,
        final,
        sources,
    )


def evals_per_hour(records: Sequence[dict[str, Any]]) -> float | None:
    """Search evaluations per wall-clock hour: from the first evaluation's start (its journal time
    minus its seconds) to the last journal time. Pauses between a kill and a resume count too."""
    timed = [
        (_dt.datetime.fromisoformat(r["time"]).timestamp(), float(r.get("seconds") or 0.0))
        for r in records
        if r.get("time")
    ]
    if not timed:
        return None
    span = max(end for end, _ in timed) - min(end - seconds for end, seconds in timed)
    return len(records) * 3600.0 / span if span >= 1.0 else None
