"""`evomerge search | resume | export`: option handling, the live display, and hand-over to the driver."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run import BEST_FILE, FINAL_FILE, RunDir, atomic_write


class SearchDisplay:
    """Generation, evaluations done / budget, best fitness, evals/min and ETA.

    A rich live panel on a terminal; one plain line per generation (and per phase) otherwise, so
    logs and test captures stay readable."""

    def __init__(self, run_name: str):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live_mode = self.console.is_terminal
        self.run_name = run_name
        self._live: Any = None
        self._start_done: int | None = None
        self._start_time = time.monotonic()
        self._last_line: tuple[Any, ...] | None = None

    def __enter__(self) -> SearchDisplay:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def __call__(self, progress: Any, record: dict[str, Any] | None) -> None:
        if self._start_done is None:
            self._start_done = progress.done - (1 if record and record["phase"] == "search" else 0)
        elapsed = max(time.monotonic() - self._start_time, 1e-9)
        new = progress.done - self._start_done
        rate = 60.0 * new / elapsed
        remaining = max(progress.budget - progress.done, 0)
        eta = remaining / (rate / 60.0) if rate > 0 else None
        fields = {
            "run": self.run_name,
            "phase": progress.phase,
            "kind": progress.kind,
            "generation": f"{min(progress.generation + 1, progress.budget // progress.popsize)}"
            f"/{progress.budget // progress.popsize}",
            "evals": f"{progress.done}/{progress.budget}",
            "failed": str(progress.failed),
            "best": "-" if progress.best is None else f"{progress.best:.4f}",
            "evals/min": f"{rate:.1f}",
            "eta": "-" if eta is None else _duration(eta),
        }
        if self._live is not None:
            from rich.table import Table

            table = Table(show_header=False, box=None, title=f"evomerge search: {self.run_name}")
            for key, value in fields.items():
                table.add_row(key, value)
            self._live.update(table)
            return
        line_key = (progress.phase, progress.done // max(progress.popsize, 1))
        if line_key != self._last_line:
            self._last_line = line_key
            self.console.print("  ".join(f"{k}={v}" for k, v in fields.items()), highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _print_summary(summary: dict[str, Any], echo: Any) -> None:
    final = summary.get("final")
    if not final:
        echo(f"no final recipe: {summary.get('reason', 'nothing evaluated')}")
        return
    report = summary["splits"]["report"]
    block = final[report]
    ci = block.get("ci95")
    ci_text = f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
    score = block.get("score")
    echo(
        f"final ({FINAL_FILE}) {report} score: {score:.4f}{ci_text}"
        if score is not None
        else f"final ({FINAL_FILE}) {report} evaluation failed: {block.get('reason')}"
    )
    for model, entry in summary["sources"].items():
        value = entry[report].get("score")
        shown = f"{value:.4f}" if value is not None else "failed"
        echo(f"  {entry['role']} {model}: {shown}")
    echo(f"evaluations: {summary['evaluations']} (failed: {summary['failed']})")


def run_search(
    space_path: Path,
    run_dir: Path,
    *,
    workers: int,
    ray_address: str | None,
    max_evals: int | None,
    seed: int | None,
    optimizer: str | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    from evomerge.search import Search, local_or_ray_executor, start_run
    from evomerge.space import SearchSpace, load_space_config, parse_space

    config = load_space_config(space_path)
    update: dict[str, Any] = {}
    if seed is not None:
        if seed < 0:
            raise EvomergeError("--seed: must be >= 0")
        update["seed"] = seed
    if max_evals is not None:
        if max_evals < 1:
            raise EvomergeError("--max-evals: must be >= 1")
        update["budget"] = config.budget.model_copy(update={"max_evals": max_evals})
    if optimizer is not None:
        update["optimizer"] = parse_space(
            {**config.model_dump(mode="json"), "optimizer": optimizer}, source="--optimizer"
        ).optimizer
    config = config.model_copy(update=update)
    _check_workers(workers)
    root = Path(space_path).resolve().parent
    if config.zoo is not None:
        from evomerge.zoo import verify_zoo

        verify_zoo(root / config.zoo.path, seed=config.zoo.seed, mini=config.zoo.mini)
    run = RunDir(run_dir)
    factory = local_or_ray_executor(workers, ray_address)
    if config.kind == "ps+dfs":
        from evomerge.staged import resolve_staged

        resolved = resolve_staged(config, root)
        return _staged(run, resolved, factory, echo, new=True, max_evals=None)
    space = SearchSpace(config, root=root)
    start_run(space, run)
    return _drive(Search, space, run, factory, echo)


def run_resume(
    run_dir: Path, *, max_evals: int | None, workers: int, ray_address: str | None, echo: Any = print
) -> dict[str, Any]:
    from evomerge.search import Search, local_or_ray_executor, set_max_evals
    from evomerge.space import SearchSpace, load_space_config

    run = RunDir(run_dir)
    run.require()
    _check_workers(workers)
    if max_evals is not None and max_evals < 1:
        raise EvomergeError("--max-evals: must be >= 1")
    config = load_space_config(run.space_file)
    factory = local_or_ray_executor(workers, ray_address)
    if config.kind == "ps+dfs":
        return _staged(run, config, factory, echo, new=False, max_evals=max_evals)
    space = SearchSpace(config, root=run.path.resolve())
    if max_evals is not None:
        set_max_evals(space, run, max_evals)
    return _drive(Search, space, run, factory, echo)


def _check_workers(workers: int) -> None:
    if workers < 0:
        raise EvomergeError("--workers: must be >= 0 (0: one per GPU, else per CPU, on Ray)")


def _drive(
    search_cls: Any, space: Any, run: RunDir, factory: Any, echo: Any, *, quiet: bool = False, name: str | None = None
) -> dict[str, Any]:
    with SearchDisplay(name or run.path.name) as display:
        summary = search_cls(run, space, factory, observer=display).run_all()
    if not quiet:
        _print_summary(summary, echo)
    return summary


def _staged(run: RunDir, config: Any, factory: Any, echo: Any, *, new: bool, max_evals: int | None) -> dict:
    from evomerge.search import Search
    from evomerge.staged import run_staged

    def drive(space: Any, stage_run: RunDir) -> dict[str, Any]:
        return _drive(
            Search, space, stage_run, factory, echo, quiet=True, name=f"{run.path.name}/{stage_run.path.name}"
        )

    summary = run_staged(run, config, drive, new=new, max_evals=max_evals)
    _print_summary(summary, echo)
    return summary


def run_export(run_dir: Path, out: Path, *, merge_dir: Path | None, pick: int | None = None, echo: Any = print) -> None:
    from evomerge.recipe import dump_recipe, load_recipe

    run = RunDir(run_dir)
    run.require()
    source = run.file(FINAL_FILE)
    if pick is not None:
        recipe, source = _front_recipe(run, pick)
    elif not source.exists():
        source = run.file(BEST_FILE)
        if not source.exists():
            raise EvomergeError(
                f"run: {run.path} has no {FINAL_FILE} or {BEST_FILE} yet; no candidate has been evaluated successfully"
            )
        echo(f"note: the run has not finished; exporting {BEST_FILE} (best by search fitness so far)")
    if pick is None:
        recipe = load_recipe(source)
    if merge_dir is not None:
        from evomerge.checkpoint import check_output_dir

        check_output_dir(Path(merge_dir), overwrite=False)
    atomic_write(Path(out), dump_recipe(recipe))
    echo(f"wrote {out} (from {source})")
    if merge_dir is not None:
        from evomerge.merge import merge_from_file

        merge_from_file(Path(out), Path(merge_dir), progress=False, echo=echo)
        echo(f"merged into {merge_dir}")


def _front_recipe(run: RunDir, pick: int) -> tuple[Any, str]:
    """Entry `pick` (0-based, as `evomerge report` lists them) of the run's Pareto front."""
    from evomerge.report_data import front_file, load_pareto
    from evomerge.run import PARETO_FILE
    from evomerge.search import parse_recipe_text

    path = front_file(run.path)
    if path is None:
        raise EvomergeError(f"--pick: {run.path} has no {PARETO_FILE}; only runs with objectives keep a front")
    front = load_pareto(path)
    if not 0 <= pick < len(front):
        raise EvomergeError(f"--pick: {pick} is not an entry of the front (0 to {len(front) - 1})")
    entry = front[pick]
    return parse_recipe_text(entry["recipe"]), f"{path} entry {pick}, {entry['eval_id']}"
