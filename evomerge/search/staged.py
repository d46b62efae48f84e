"""PS+DFS as the paper ran it: two searches in sequence, each an ordinary run.

    runs/NAME/space.yaml       the resolved PS+DFS space
    runs/NAME/ps/              stage 1: a PS run (journal, run.json, final.yaml, summary.json)
    runs/NAME/ps/model/        its final recipe merged by the merge engine (written atomically)
    runs/NAME/dfs/             stage 2: a DFS run over [ps/model, *dfs.models], ps/model the anchor
    runs/NAME/final.yaml       = dfs/final.yaml (it references ps/model), summary.json: both stages

Why two stages and not one genome: a single mergekit recipe cannot express "merge, then stack"
(passthrough slices take one source each), so one genome would need an exotic format; two stages
keep every recipe ordinary, match Akiba et al. (PS result put back into the pool as model A), and
resume stage by stage exactly as a single run does: each stage replays its own journal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.plan import ModelCatalog
from evomerge.search.run import FINAL_FILE, SPACE_FILE, SUMMARY_FILE, RunDir
from evomerge.search.space import SearchSpace, SpaceConfig, dump_space_config

PS_STAGE, DFS_STAGE, PS_MODEL = "ps", "dfs", "model"


def resolve_staged(config: SpaceConfig, root: Path) -> SpaceConfig:
    """Absolute paths everywhere (bound through the PS stage, which validates the PS half)."""
    if config.dfs is not None and config.dfs.anchor is not None:
        raise EvomergeError("dfs.anchor: in a PS+DFS space the PS result is the anchor; remove dfs.anchor")
    ps_space = SearchSpace(config.model_copy(update={"dfs": None}), root=root)
    catalog = ModelCatalog([Path(root).resolve()])
    assert config.dfs is not None
    dfs_models = [str(catalog.resolve(m, f"dfs.models[{i}]").path) for i, m in enumerate(config.dfs.models or [])]
    resolved = ps_space.config.model_copy(update={"dfs": config.dfs.model_copy(update={"models": dfs_models or None})})
    budget = resolved.budget.model_copy(update={"popsize": config.budget.popsize})  # per stage when unset
    return resolved.model_copy(update={"budget": budget})


def dfs_stage_config(config: SpaceConfig, ps_model: Path) -> SpaceConfig:
    assert config.dfs is not None
    models = [str(ps_model), *(config.dfs.models or config.models)]
    dfs = config.dfs.model_copy(update={"models": models, "anchor": str(ps_model)})
    return config.model_copy(update={"ps": None, "dfs": dfs})


def run_staged(
    run: RunDir, config: SpaceConfig, drive: Any, *, new: bool, max_evals: int | None = None
) -> dict[str, Any]:
    """Run (or resume) both stages; `drive(search_space, run_dir)` runs one stage to its end."""
    from evomerge.search.driver import set_max_evals, start_run

    if new:
        run.create()
        run.write_text(SPACE_FILE, dump_space_config(config))
    stages = {}
    ps_run = RunDir(run.path / PS_STAGE)
    ps_done = ps_run.file(SUMMARY_FILE).exists()
    ps_space = _stage_space(
        config.model_copy(update={"dfs": None}), ps_run, max_evals if not ps_done else None, start_run, set_max_evals
    )
    stages[PS_STAGE] = drive(ps_space, ps_run)
    ps_model = ps_run.path.resolve() / PS_MODEL
    if not (ps_model / "config.json").exists():
        if not ps_run.file(FINAL_FILE).exists():
            raise EvomergeError(f"{ps_run.path}: the PS stage produced no final recipe; cannot run the DFS stage")
        from evomerge.merge.runner import merge_from_file

        merge_from_file(ps_run.file(FINAL_FILE), ps_model, progress=False, echo=lambda *_: None)
    dfs_run = RunDir(run.path / DFS_STAGE)
    dfs_space = _stage_space(dfs_stage_config(config, ps_model), dfs_run, max_evals, start_run, set_max_evals)
    stages[DFS_STAGE] = drive(dfs_space, dfs_run)
    summary = dict(stages[DFS_STAGE])
    if summary.get("final"):
        run.write_text(FINAL_FILE, dfs_run.file(FINAL_FILE).read_text())
        summary["final"] = {
            **summary["final"],
            "recipe": FINAL_FILE,
            "ps_recipe": f"{PS_STAGE}/{FINAL_FILE}",
            "ps_model": f"{PS_STAGE}/{PS_MODEL}",
        }
    report = config.splits.report
    sources = {model: entry for model, entry in stages[PS_STAGE].get("sources", {}).items()}
    for model, entry in stages[DFS_STAGE].get("sources", {}).items():
        sources[model] = {**entry, "role": "ps" if Path(model) == ps_model else entry["role"]}
    summary.update(
        kind="ps+dfs",
        sources=sources,
        stages={k: f"{k}/{SUMMARY_FILE}" for k in stages},
        evaluations=sum(s["evaluations"] for s in stages.values()),
        failed=sum(s["failed"] for s in stages.values()),
    )
    summary.setdefault("splits", {})["report"] = report
    run.write_json(SUMMARY_FILE, summary)
    return summary


def _stage_space(
    config: SpaceConfig, run: RunDir, max_evals: int | None, start_run: Any, set_max_evals: Any
) -> SearchSpace:
    """The stage's own recorded space when it has started (its budget may have been extended), else a new run."""
    from evomerge.search.space import load_space_config

    if run.exists():
        space = SearchSpace(load_space_config(run.space_file), root=run.path.resolve())
        if max_evals is not None:
            set_max_evals(space, run, max_evals)
        return space
    if max_evals is not None:
        config = config.model_copy(update={"budget": config.budget.model_copy(update={"max_evals": max_evals})})
    space = SearchSpace(config, root=run.path.resolve())
    start_run(space, run)
    return space
