"""Command-line interface: `evomerge zoo|eval|merge|search|resume|export|report`.

Each command parses its options and hands over to a module that does the work; user errors
(`EvomergeError`) are printed as one line and exit with status 2, leaving no partial output.

Importing this module must stay cheap (`evomerge --help` in well under a second): torch,
transformers, Ray, lm-eval, datasets and matplotlib are imported inside the commands that use
them, and the merge methods' help comes from a torch-free table (evomerge/merge/method_summaries.py).
Help is click's plain format: typer's rich panels print flags with a `<bool>` type.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from evomerge.errors import EvomergeError, Interrupted, os_error
from evomerge.merge.method_summaries import METHOD_SUMMARIES

os.environ.setdefault("TQDM_DISABLE", "1")  # rich shows progress; silence the libraries' tqdm bars

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Evolutionary search for model-merge recipes (mergekit-compatible).",
)
zoo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The embedded toy model zoo.")
app.add_typer(zoo_app, name="zoo")

WORKERS_HELP = (
    "How many evaluation workers. Default: one, in this process; with --ray-address, one per GPU of "
    "the cluster (one per CPU if it has no GPU: workers run single-threaded; each holds its own copy "
    "of the sources, so cap N for large models). N > 1 without --ray-address: a private Ray "
    "instance on this machine."
)
RAY_ADDRESS_HELP = (
    "Run the workers on the Ray cluster at HOST:PORT, or 'auto' (RAY_ADDRESS, else the one `ray start` "
    "began on this machine); joined before the run directory is written."
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an EvomergeError (or an OSError: full disk, permissions) into `error: <message>` (and its
    hint line) on stderr and a non-zero exit, and Ctrl-C into one line and status 130 instead of a
    traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            exc: EvomergeError = Interrupted("")
        except EvomergeError as error:
            exc = error
        except OSError as error:  # full disk, permissions, read-only file system: one line, no traceback
            exc = os_error(error)
        typer.echo(f"{exc.label}: {exc}" if str(exc) else exc.label, err=True)
        if exc.hint:
            typer.echo(exc.hint, err=True)
        raise typer.Exit(exc.exit_code)

    return wrapper


@zoo_app.command("build")
@user_errors
def zoo_build(
    out_dir: Path = typer.Argument(
        ..., metavar="OUT_DIR", help="Directory to write the zoo into (replaced atomically)."
    ),
    seed: int = typer.Option(0, help="Root seed: same seed, same bytes."),
    mini: bool = typer.Option(False, "--mini", help="Tiny, fast zoo for tests (targets do not apply)."),
    kind: str = typer.Option(
        "toy",
        "--kind",
        help="toy: base + add/rev/shift experts; composition: base + L2 language expert + L1 math expert "
        "(target: math in L2, docs/zoo.md).",
    ),
) -> None:
    """Train the toy base model and its experts, score them, write OUT_DIR/manifest.json."""
    if kind == "composition":
        from evomerge.zoo.composition import build_composition_zoo

        if mini:
            raise EvomergeError("--mini: the composition zoo has no mini flavour")
        build_composition_zoo(out_dir, seed=seed)
        return
    if kind != "toy":
        raise EvomergeError(f"--kind: {kind!r} is not one of toy, composition")
    from evomerge.zoo.models import build_zoo

    build_zoo(out_dir, seed=seed, mini=mini)


@zoo_app.command("verify")
@user_errors
def zoo_verify(
    zoo_dir: Path = typer.Argument(..., help="A zoo directory, e.g. zoo/toy (the shipped one) or an OUT_DIR."),
) -> None:
    """Check every file of a zoo against its SHA256SUMS and its manifest against its model folders."""
    from evomerge.zoo.models import verify_zoo

    manifest = verify_zoo(zoo_dir)
    typer.echo(f"ok: {zoo_dir} (seed {manifest['seed']}{', mini' if manifest['mini'] else ''}) matches its SHA256SUMS")


@app.command("eval")
@user_errors
def eval_cmd(
    model_dir: Path = typer.Argument(
        ..., metavar="MODEL_DIR", help="A model directory (config.json + safetensors + tokenizer)."
    ),
    tasks: str = typer.Option("toy_add,toy_rev", help="Comma-separated lm-eval task names."),
    limit: int | None = typer.Option(None, help="Score only the first N examples of each task."),
    subset_seed: int | None = typer.Option(None, help="With --limit: a seeded subset (as search workers pick)."),
    split: str = typer.Option("test", help="Which split to score: train, validation or test."),
    include_path: list[Path] = typer.Option([], metavar="DIR", help="Extra folder of lm-eval task YAMLs."),
    batch_size: int = typer.Option(64, help="lm-eval batch size."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    apply_chat_template: bool = typer.Option(
        False, "--apply-chat-template", help="Wrap prompts in the tokenizer's chat template (as lm_eval's option)."
    ),
    fewshot_as_multiturn: bool = typer.Option(
        False,
        "--fewshot-as-multiturn",
        help="Few-shot examples as chat turns (on by default with --apply-chat-template, as in lm_eval).",
    ),
    single_turn: bool = typer.Option(
        False, "--no-fewshot-as-multiturn", help="With --apply-chat-template: few-shot examples in one user turn."
    ),
    system_instruction: str | None = typer.Option(None, help="A system message before each prompt (as lm_eval)."),
) -> None:
    """Score a model directory on lm-eval tasks, offline."""
    from evomerge.cli.evaluate import prompt_options, run_eval

    run_eval(
        model_dir,
        [t for t in tasks.split(",") if t],
        limit=limit,
        split=split,
        include_paths=include_path,
        batch_size=batch_size,
        device=device,
        as_json=as_json,
        subset_seed=subset_seed,
        prompts=prompt_options(apply_chat_template, fewshot_as_multiturn, single_turn, system_instruction),
    )


def _merge_help() -> str:
    methods = "\n".join(f"  {name}: {summary}" for name, summary in METHOD_SUMMARIES.items())
    # "\b": click prints that paragraph as it is (one method per line) instead of re-wrapping it
    return (
        "Merge models as a mergekit-style RECIPE describes, into OUT_DIR (written atomically).\n\n"
        f"Methods:\n\n\b\n{methods}"
    )


def _mergekit_options(
    device: str,
    seed: int | None,
    max_shard_size: str,
    cuda: bool,
    random_seed: int | None,
    out_shard_size: str | None,
    allow_crimes: bool,
    lazy_unpickle: bool,
    trust_remote_code: bool,
) -> tuple[str, int | None, str]:
    """mergekit-yaml's options mapped onto evomerge's (device, seed, max shard size), with one line
    on stderr for each that has no effect here."""
    if trust_remote_code:
        raise EvomergeError(
            "--trust-remote-code: evomerge never runs code shipped with a model; every architecture it "
            "merges is described by data (docs/merge.md, Architectures)"
        )
    if cuda:
        if device not in ("cpu", "cuda") and not device.startswith("cuda"):
            raise EvomergeError(f"--cuda: conflicts with --device {device}; give one of them")
        device = device if device.startswith("cuda") else "cuda"
    if random_seed is not None:
        if seed is not None and seed != random_seed:
            raise EvomergeError("--random-seed: conflicts with --seed; give one of them")
        seed = random_seed
    if out_shard_size is not None:
        max_shard_size = str(_kmb_bytes(out_shard_size))
    if allow_crimes:
        typer.echo(
            "note: --allow-crimes has no effect: evomerge merges models whose tensors line up by name and "
            "shape (one architecture family) and refuses others with the tensor that differs",
            err=True,
        )
    if lazy_unpickle:
        typer.echo("note: --lazy-unpickle has no effect: evomerge reads safetensors only, lazily", err=True)
    return device, seed, max_shard_size


def _kmb_bytes(text: str) -> int:
    """mergekit's size syntax: a count with an optional K, M or B (thousand, million, billion) suffix."""
    value = text.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(value[-1:].lower(), 1)
    digits = value[:-1] if scale != 1 else value
    if not digits.isdigit() or int(digits) == 0:
        raise EvomergeError(f"--out-shard-size: cannot parse {text!r}; use mergekit's form, e.g. 5B, 500M or 1000000")
    return int(digits) * scale


@app.command("merge", help=_merge_help())
@user_errors
def merge_cmd(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML (mergekit schema)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Output model directory (appears only when complete)."),
    seed: int | None = typer.Option(None, help="Seed for random methods (default: the recipe's seed, else 0)."),
    device: str = typer.Option("cpu", help="cpu or cuda: where the merge math runs."),
    max_shard_size: str = typer.Option("2GB", help="Largest output shard, e.g. 2GB, 500MB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    threads: int | None = typer.Option(
        None, min=1, help="CPU threads for the merge math (default: torch's; 1 is often fastest on a busy machine)."
    ),
    # mergekit-yaml's spellings, so its command lines run unchanged
    cuda: bool = typer.Option(False, "--cuda", help="mergekit-yaml's flag: same as --device cuda."),
    random_seed: int | None = typer.Option(None, "--random-seed", help="mergekit-yaml's name for --seed."),
    out_shard_size: str | None = typer.Option(
        None, "--out-shard-size", help="mergekit-yaml's shard size in bytes, K/M/B = 10^3/10^6/10^9 (5B = 5 GB)."
    ),
    allow_crimes: bool = typer.Option(False, "--allow-crimes", help="Accepted for mergekit-yaml; see docs/merge.md."),
    lazy_unpickle: bool = typer.Option(False, "--lazy-unpickle", help="Accepted for mergekit-yaml; no effect."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Refused: no model code is run."),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Write tensors holding NaN/inf (refused by default, naming the tensor)."
    ),
    copy_tokenizer: bool = typer.Option(
        True, "--copy-tokenizer/--no-copy-tokenizer", help="Write the (merged) tokenizer with the model."
    ),
) -> None:

    device, seed, max_shard_size = _mergekit_options(
        device, seed, max_shard_size, cuda, random_seed, out_shard_size, allow_crimes, lazy_unpickle, trust_remote_code
    )
    from evomerge.merge.recipe import load_recipe
    from evomerge.merge.validation import validate_recipe

    validate_recipe(load_recipe(recipe))  # a bad recipe is reported before torch is imported

    from evomerge.io.allocator import keep_freed_memory
    from evomerge.merge.runner import merge_from_file

    keep_freed_memory()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    merge_from_file(
        recipe,
        out_dir,
        seed=seed,
        device=device,
        max_shard_size=max_shard_size,
        dry_run=dry_run,
        overwrite=overwrite,
        progress=not quiet,
        echo=typer.echo,
        allow_nonfinite=allow_nonfinite,
        copy_tokenizer=copy_tokenizer,
    )


@app.command("search")
@user_errors
def search_cmd(
    space: Path = typer.Argument(..., metavar="SPACE", help="Search space YAML (search_spaces/*.yaml)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="New run directory, e.g. runs/NAME."),
    workers: int | None = typer.Option(None, show_default=False, help=WORKERS_HELP),
    ray_address: str | None = typer.Option(None, help=RAY_ADDRESS_HELP),
    max_evals: int | None = typer.Option(
        None, help="Override the space's budget.max_evals (a total, rounded down to whole generations)."
    ),
    seed: int | None = typer.Option(None, help="Override the space's root seed."),
    optimizer: str | None = typer.Option(
        None, help="Override the space's optimizer: cma, random, or optuna:tpe / optuna:cmaes / optuna:nsga2."
    ),
) -> None:
    """Run an evolutionary merge search; journal every evaluation; write final.yaml and summary.json.

    Ctrl-C (or an error) stops it with the `evomerge resume` command that continues it."""
    from evomerge.cli.search import run_search

    run_search(
        space,
        run_dir,
        workers=workers,
        ray_address=ray_address,
        max_evals=max_evals,
        seed=seed,
        optimizer=optimizer,
        echo=typer.echo,
    )


@app.command("resume")
@user_errors
def resume_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory written by `evomerge search`."),
    max_evals: int | None = typer.Option(
        None, help="New total budget (not an increment; at least what is journaled): extends a finished run."
    ),
    workers: int | None = typer.Option(None, show_default=False, help=WORKERS_HELP),
    ray_address: str | None = typer.Option(None, help=RAY_ADDRESS_HELP),
) -> None:
    """Continue a run where it stopped (journaled evaluations are reused, never recomputed)."""
    from evomerge.cli.search import run_resume

    run_resume(run_dir, max_evals=max_evals, workers=workers, ray_address=ray_address, echo=typer.echo)


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the recipe YAML."),
    merge: Path | None = typer.Option(None, "--merge", help="Also merge the recipe into this model directory."),
    pick: int | None = typer.Option(None, "--pick", help="Export entry N (0-based) of the run's pareto.json."),
) -> None:
    """Write the run's final recipe (mergekit schema); optionally merge it like `evomerge merge`."""
    from evomerge.cli.search import run_export

    run_export(run_dir, out, merge_dir=merge, pick=pick, echo=typer.echo)


@app.command("report")
@user_errors
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (finished or still going)."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output folder (default: RUN_DIR/report)."),
) -> None:
    """Plot fitness, per-layer parameters, the DFS path (and a Pareto front); write PNGs + index.html."""
    from rich.console import Console

    from evomerge.search.run import RunDir

    RunDir(run_dir).require()  # before matplotlib and torch are imported

    from evomerge.report.build import build_report, print_report

    print_report(build_report(run_dir, out), Console())


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
