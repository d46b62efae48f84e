"""`evomerge search | resume | export`: option handling, the live display, and hand-over to the driver.

The order is what makes bad input cheap: options, the space and the Ray cluster are checked before
the run directory is created, so a mistake leaves nothing behind. Once the run exists, whatever
stops the search (an error, a broken worker, Ctrl-C) ends with the command that continues it.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, Interrupted, os_error
from evomerge.search.run import BEST_FILE, FINAL_FILE, RunDir, atomic_write


class SearchDisplay:
    """Generation, evaluations done / budget and still to go, best fitness, evals/min and ETA.

    A rich live panel on a terminal; otherwise a header line, then one plain line per generation (and
    per phase), so logs and test captures stay readable. `start` shows the state before any worker
    is up (loading the sources takes a while); a resumed run shows what its journal already holds."""

    def __init__(self, command: str, run_name: str):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live_mode = self.console.is_terminal
        self.command = command
        self.run_name = run_name
        self._live: Any = None
        self._start_done = 0
        self._start_time = time.monotonic()
        self._last_line: tuple[Any, ...] | None = None

    @property
    def title(self) -> str:
        return f"evomerge {self.command}: {self.run_name}"

    def __enter__(self) -> SearchDisplay:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def start(self, progress: Any) -> None:
        """Before the first evaluation: what is already journaled and what is left of the budget."""
        self._start_done = progress.done
        self._start_time = time.monotonic()
        if self._live is not None:
            self._render(progress)
            return
        gens = max(progress.budget // progress.popsize, 1)
        plan = f"{progress.budget} evaluations ({gens} generations of {progress.popsize})"
        if self.command == "resume":
            left = max(progress.budget - progress.done, 0)
            plan = f"{progress.done} of {plan} journaled, {left} to go"
        self.console.print(f"{self.title}: {plan}", highlight=False, soft_wrap=True)

    def __call__(self, progress: Any, record: dict[str, Any] | None) -> None:
        if self._live is not None:
            self._render(progress)
            return
        line_key = (progress.phase, progress.done // max(progress.popsize, 1))
        if line_key != self._last_line:
            self._last_line = line_key
            fields = self._fields(progress)
            self.console.print("  ".join(f"{k}={v}" for k, v in fields.items()), highlight=False, soft_wrap=True)

    def _render(self, progress: Any) -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None, title=self.title)
        for key, value in self._fields(progress).items():
            table.add_row(key, value)
        self._live.update(table)

    def _fields(self, progress: Any) -> dict[str, str]:
        elapsed = max(time.monotonic() - self._start_time, 1e-9)
        rate = 60.0 * (progress.done - self._start_done) / elapsed
        remaining = max(progress.budget - progress.done, 0)
        eta = remaining / (rate / 60.0) if rate > 0 else None
        gens = max(progress.budget // progress.popsize, 1)
        fields = {
            "run": self.run_name,
            "phase": progress.phase,
            "kind": progress.kind,
            "generation": f"{min(progress.done // progress.popsize + 1, gens)}/{gens}",
            "evals": f"{progress.done}/{progress.budget}",
            "to go": str(remaining),
        }
        if self.command == "resume":
            fields["journaled before"] = str(self._start_done)
        fields.update(
            {
                "failed": str(progress.failed),
                "best": "-" if progress.best is None else f"{progress.best:.4f}",
                "evals/min": f"{rate:.1f}",
                "eta": "-" if eta is None else _duration(eta),
            }
        )
        return fields


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
    workers: int | None,
    ray_address: str | None,
    max_evals: int | None,
    seed: int | None,
    optimizer: str | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    from evomerge.io.yaml_files import read_text

    _check_counts(workers, max_evals)
    if seed is not None and seed < 0:
        raise EvomergeError("--seed: must be >= 0")
    run = RunDir(run_dir)
    run.check_new()
    read_text(Path(space_path), "search space")  # a missing file is reported before torch is imported

    from evomerge.search.space import load_space_config, parse_space
    from evomerge.search.space.config import DEFAULT_WORKER
    from evomerge.workers.candidate import FACTORY_ALIASES

    config = load_space_config(space_path)
    update: dict[str, Any] = {}
    if seed is not None:
        update["seed"] = seed
    if max_evals is not None:
        update["budget"] = config.budget.model_copy(update={"max_evals": max_evals})
    if optimizer is not None:
        update["optimizer"] = parse_space(
            {**config.model_dump(mode="json"), "optimizer": optimizer}, source="--optimizer"
        ).optimizer
    config = config.model_copy(update=update)
    root = Path(space_path).resolve().parent
    resume = _resume_command(run, workers, ray_address)
    if config.worker.factory in (DEFAULT_WORKER, *FACTORY_ALIASES):  # lm-eval tasks: names, metrics, before the run
        from evomerge.io.tasks import check_tasks

        check_tasks([(t.name, t.metric) for t in config.tasks], [root / p for p in config.include_paths])
    with _evaluation_backend(workers, ray_address) as factory:
        if config.zoo is not None:
            from evomerge.zoo.models import verify_zoo

            verify_zoo(root / config.zoo.path, seed=config.zoo.seed, mini=config.zoo.mini)
        from evomerge.search.entry import new_search

        with _saved_run(run, resume):
            summary = new_search(config, root, run, factory, display=_display("search"))
    _print_summary(summary, echo)
    return summary


def run_resume(
    run_dir: Path, *, max_evals: int | None, workers: int | None, ray_address: str | None, echo: Any = print
) -> dict[str, Any]:
    run = RunDir(run_dir)
    run.require()
    _check_counts(workers, max_evals)

    from evomerge.search.entry import resume_search
    from evomerge.search.space import load_space_config

    config = load_space_config(run.space_file)
    resume = _resume_command(run, workers, ray_address)
    with _evaluation_backend(workers, ray_address) as factory, _saved_run(run, resume):
        summary = resume_search(run, factory, config=config, max_evals=max_evals, display=_display("resume"))
    _print_summary(summary, echo)
    return summary


def _check_counts(workers: int | None, max_evals: int | None) -> None:
    """The options search and resume share, checked before anything is read or started."""
    if workers is not None and workers < 1:
        raise EvomergeError("--workers: must be >= 1; leave it out for the default (see --help)")
    if max_evals is not None and max_evals < 1:
        raise EvomergeError("--max-evals: must be >= 1")


def _resume_command(run: RunDir, workers: int | None, ray_address: str | None) -> str:
    """The command that continues `run` on the same workers (resume does not record them)."""
    words = ["evomerge", "resume", str(run.path)]
    if workers is not None:
        words += ["--workers", str(workers)]
    if ray_address is not None:
        words += ["--ray-address", ray_address]
    return shlex.join(words)


@contextmanager
def _saved_run(run: RunDir, resume: str) -> Iterator[None]:
    """Whatever stops the search once the run directory exists ends with the command that continues it."""
    hint = f"the run is saved; continue it with: {resume}"
    try:
        yield
    except KeyboardInterrupt:
        if not run.exists():  # stopped while the space was still being bound: nothing to continue
            raise
        raise Interrupted(hint) from None
    except EvomergeError as exc:
        if run.exists() and exc.hint is None:
            exc.hint = hint
        raise
    except OSError as exc:  # a full disk or a permission change mid-run: the journal is still resumable
        raise os_error(exc, hint if run.exists() else None) from None
    except Exception as exc:  # a bug: keep the traceback, add the way on
        if run.exists():
            exc.add_note(hint)
        raise


@contextmanager
def _evaluation_backend(workers: int | None, ray_address: str | None) -> Iterator[Any]:
    """The executor factory of the run. A cluster named by --ray-address is joined and checked
    against --workers now, before the run directory exists, so a wrong address leaves nothing
    behind; a private local Ray instance (--workers N) starts with the first evaluation."""
    from evomerge.search.entry import local_or_ray_executor
    from evomerge.workers.ray_cluster import is_local_address

    owned = ray_address is not None and not is_local_address(ray_address) and _join_cluster(ray_address, workers)
    try:
        yield local_or_ray_executor(workers, ray_address)
    finally:
        if owned:
            import ray

            ray.shutdown()


def _join_cluster(address: str, workers: int | None) -> bool:
    """Connect to the cluster; True when this call connected (and must disconnect)."""
    import logging

    import ray

    from evomerge.workers.ray_cluster import PoolSizeError, init_ray, plan_pool, unreachable
    from evomerge.workers.worker_host import describe_exception

    fix = "start the cluster (`ray start --head`) or leave --ray-address out to evaluate on this machine"
    problem = unreachable(address)
    if problem is not None:
        raise EvomergeError(f"--ray-address: {problem}; {fix}")
    try:
        owned = init_ray(address, logging_level=logging.WARNING)
    except Exception as exc:  # ray.init raises ConnectionError, RuntimeError or ValueError
        raise EvomergeError(
            f"--ray-address: cannot join a Ray cluster at {address!r} ({describe_exception(exc)}); {fix}"
        ) from None
    try:
        plan_pool(ray.cluster_resources(), workers)
    except PoolSizeError as exc:
        if owned:
            ray.shutdown()
        raise EvomergeError(f"--workers: {exc}") from None
    return owned


def _display(command: str) -> Any:
    """The live display of each search the command runs (one per stage of a PS+DFS run)."""
    return lambda name: SearchDisplay(command, name)


def run_export(run_dir: Path, out: Path, *, merge_dir: Path | None, pick: int | None = None, echo: Any = print) -> None:
    from evomerge.merge.recipe import dump_recipe, load_recipe

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
        from evomerge.io.checkpoint import check_output_dir

        check_output_dir(Path(merge_dir), overwrite=False)
    atomic_write(Path(out), dump_recipe(recipe))
    echo(f"wrote {out} (from {source})")
    if merge_dir is not None:
        from evomerge.merge.runner import merge_from_file

        merge_from_file(Path(out), Path(merge_dir), progress=False, echo=echo)
        echo(f"merged into {merge_dir}")


def _front_recipe(run: RunDir, pick: int) -> tuple[Any, str]:
    """Entry `pick` (0-based, as `evomerge report` lists them) of the run's Pareto front."""
    from evomerge.merge.recipe import parse_recipe_text
    from evomerge.report.data import front_file, load_pareto
    from evomerge.search.run import PARETO_FILE

    path = front_file(run.path)
    if path is None:
        raise EvomergeError(f"--pick: {run.path} has no {PARETO_FILE}; only runs with objectives keep a front")
    front = load_pareto(path)
    if not 0 <= pick < len(front):
        raise EvomergeError(f"--pick: {pick} is not an entry of the front (0 to {len(front) - 1})")
    entry = front[pick]
    return parse_recipe_text(entry["recipe"]), f"{path} entry {pick}, {entry['eval_id']}"
