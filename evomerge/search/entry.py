"""The one entry point of the search: start or resume a run, whatever its kind.

`new_search` and `resume_search` take a search space and a run directory and run it to its end,
single-stage or PS+DFS, so a caller (the CLI, a benchmark) never decides how a run is staged.
`display(name)`, when given, opens a context manager that yields the observer of one search (the
CLI's live display); it is opened once per stage.

PS+DFS runs as the paper ran it: two searches in sequence, each an ordinary run.

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

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.jobs import ModelCatalog
from evomerge.search.driver import ExecutorFactory, Search
from evomerge.search.run import FINAL_FILE, SPACE_FILE, SUMMARY_FILE, RunDir, read_journal
from evomerge.search.run_lock import run_lock
from evomerge.search.space import SearchSpace, SpaceConfig, dump_space_config, load_space_config
from evomerge.workers.candidate import WorkerSpec

Display = Callable[[str], AbstractContextManager[Any]]

PS_STAGE, DFS_STAGE, PS_MODEL = "ps", "dfs", "model"


def new_search(
    config: SpaceConfig, root: Path, run: RunDir, executor_factory: ExecutorFactory, *, display: Display | None = None
) -> dict[str, Any]:
    """Start a run of `config` (paths relative to `root`) in the new directory `run`; its summary."""
    if config.kind == "ps+dfs":
        config = resolve_staged(config, root)
        run.create()
        with run_lock(run.path, "search"):
            return run_staged(run, config, executor_factory, display, new=True)
    space = SearchSpace(config, root=root)
    check_before_run(space)
    run.create()
    with run_lock(run.path, "search"):
        start_run(space, run)
        return drive(space, run, executor_factory, display)


def resume_search(
    run: RunDir,
    executor_factory: ExecutorFactory,
    *,
    config: SpaceConfig | None = None,
    max_evals: int | None = None,
    display: Display | None = None,
) -> dict[str, Any]:
    """Continue `run` (its recorded space, or `config` read from it) to its end; `max_evals` is a
    new total budget. Journaled evaluations replay without a worker."""
    with run_lock(run.path, "resume"):
        config = config or load_space_config(run.space_file)
        if config.kind == "ps+dfs":
            return run_staged(run, config, executor_factory, display, new=False, max_evals=max_evals)
        space = SearchSpace(config, root=run.path.resolve())
        if max_evals is not None:
            set_max_evals(space, run, max_evals)
        return drive(space, run, executor_factory, display)


def drive(
    space: SearchSpace,
    run: RunDir,
    executor_factory: ExecutorFactory,
    display: Display | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """One search to its end (search, select, report) with `display(name)` observing it."""
    if display is None:
        return Search(run, space, executor_factory).run_all()
    with display(name or run.path.name) as observer:
        search = Search(run, space, executor_factory, observer=observer)
        observer.start(search.progress)
        return search.run_all()


def resolve_staged(config: SpaceConfig, root: Path) -> SpaceConfig:
    """Absolute paths everywhere (bound through the PS stage, which validates the PS half)."""
    if config.dfs is not None and config.dfs.anchor is not None:
        raise EvomergeError("dfs.anchor: in a PS+DFS space the PS result is the anchor; remove dfs.anchor")
    ps_space = SearchSpace(config.model_copy(update={"dfs": None}), root=root)
    check_before_run(ps_space)
    catalog = ModelCatalog([Path(root).resolve()])
    assert config.dfs is not None
    dfs_models = [str(catalog.resolve(m, f"dfs.models[{i}]").path) for i, m in enumerate(config.dfs.models or [])]
    resolved = ps_space.config.model_copy(update={"dfs": config.dfs.model_copy(update={"models": dfs_models or None})})
    budget = resolved.budget.model_copy(update={"popsize": config.budget.popsize})  # per stage when unset
    return resolved.model_copy(update={"budget": budget})


def check_before_run(space: SearchSpace) -> None:
    """What can be checked without loading a model, checked before the run directory exists
    (afterwards a mistake leaves a half-made run that blocks the retry): the optimizer is built
    once, without files, and the worker factory is imported and its keyword arguments bound."""
    import inspect

    from evomerge.search.driver import worker_spec
    from evomerge.search.optimizers import make_optimizer

    make_optimizer(space, 0)
    spec = worker_spec(space)
    try:
        factory = spec.resolve_factory()
    except (ImportError, AttributeError, ValueError) as exc:
        raise EvomergeError(f"worker.factory: cannot import {spec.factory!r} ({type(exc).__name__}: {exc})") from None
    try:
        inspect.signature(factory).bind(**dict(spec.kwargs))
    except TypeError as exc:
        raise EvomergeError(f"worker.kwargs: {spec.factory} does not take these arguments ({exc})") from None
    except ValueError:  # no signature to check (a builtin): the worker reports its own errors
        pass


def dfs_stage_config(config: SpaceConfig, ps_model: Path) -> SpaceConfig:
    assert config.dfs is not None
    models = [str(ps_model), *(config.dfs.models or config.models)]
    dfs = config.dfs.model_copy(update={"models": models, "anchor": str(ps_model)})
    return config.model_copy(update={"ps": None, "dfs": dfs})


def run_staged(
    run: RunDir,
    config: SpaceConfig,
    executor_factory: ExecutorFactory,
    display: Display | None = None,
    *,
    new: bool,
    max_evals: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) both stages of a resolved PS+DFS space, each stage an ordinary run."""

    def drive_stage(space: SearchSpace, stage_run: RunDir) -> dict[str, Any]:
        return drive(space, stage_run, executor_factory, display, f"{run.path.name}/{stage_run.path.name}")

    if new:
        run.write_text(SPACE_FILE, dump_space_config(config))
    stages = {}
    ps_run = RunDir(run.path / PS_STAGE)
    ps_done = ps_run.file(SUMMARY_FILE).exists()
    ps_space = _stage_space(config.model_copy(update={"dfs": None}), ps_run, max_evals if not ps_done else None)
    stages[PS_STAGE] = drive_stage(ps_space, ps_run)
    ps_model = ps_run.path.resolve() / PS_MODEL
    if not (ps_model / "config.json").exists():
        if not ps_run.file(FINAL_FILE).exists():
            raise EvomergeError(f"{ps_run.path}: the PS stage produced no final recipe; cannot run the DFS stage")
        from evomerge.merge.runner import merge_from_file

        merge_from_file(ps_run.file(FINAL_FILE), ps_model, progress=False, echo=lambda *_: None)
    dfs_run = RunDir(run.path / DFS_STAGE)
    dfs_space = _stage_space(dfs_stage_config(config, ps_model), dfs_run, max_evals)
    stages[DFS_STAGE] = drive_stage(dfs_space, dfs_run)
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


def _stage_space(config: SpaceConfig, run: RunDir, max_evals: int | None) -> SearchSpace:
    """The stage's own recorded space when it has started (its budget may have been extended), else a new run."""
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


def start_run(space: SearchSpace, run: RunDir) -> None:
    run.create()
    run.write_text(SPACE_FILE, dump_space_config(space.config))


def set_max_evals(space: SearchSpace, run: RunDir, max_evals: int) -> SearchSpace:
    """`resume --max-evals`: a new total budget, never below the generations already started."""
    done = sum(r["phase"] == "search" for r in read_journal(run.journal_file))
    least = -(-done // space.popsize) * space.popsize
    rounded = max(1, max_evals // space.popsize) * space.popsize  # budgets count whole generations
    if max_evals > done and rounded <= done:
        raise EvomergeError(
            f"--max-evals: {max_evals} is not a whole number of generations (popsize {space.popsize}) and rounds "
            f"down to the {done} evaluations already done; pass {least + space.popsize} for one more generation"
        )
    if rounded < least:
        raise EvomergeError(
            f"--max-evals: {run.path} has {done} search evaluations journaled (popsize {space.popsize}); "
            f"it is the total budget, so pass at least {least}"
        )
    budget = space.config.budget.model_copy(update={"max_evals": max_evals})
    space.config = space.config.model_copy(update={"budget": budget})
    run.write_text(SPACE_FILE, dump_space_config(space.config))
    return space


def local_or_ray_executor(
    workers: int | None, ray_address: str | None, ray_temp_dir: str | None = None
) -> ExecutorFactory:
    """`--workers` and `--ray-address` as the CLI documents them.

    Without an address: one in-process worker (`workers` None or 1), or a private local Ray
    instance of `workers` actors. With one: `workers` actors, by default one per GPU of the
    cluster, or one per CPU on a CPU-only cluster (`plan_pool` says why)."""

    def factory(spec: WorkerSpec, penalty: float, timeout: float | None) -> Any:
        if ray_address is None and workers in (None, 1):
            from evomerge.workers.executors import LocalExecutor

            return LocalExecutor(spec, penalty=penalty, timeout=timeout, torch_threads=1)
        from evomerge.workers.executors import RayExecutor
        from evomerge.workers.ray_cluster import PoolSizeError

        try:
            return RayExecutor(
                spec,
                n_workers=workers,
                ray_address=ray_address,
                ray_temp_dir=ray_temp_dir,
                penalty=penalty,
                timeout=timeout,
            )
        except PoolSizeError as exc:
            raise EvomergeError(f"--workers: {exc}") from None

    return factory
