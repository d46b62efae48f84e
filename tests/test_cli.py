"""The CLI as a user meets it: help that is fast and clean, errors that come before torch, Ctrl-C and
errors that end with the command that continues the run, a display that is right after a resume,
and a Ray cluster that is checked before anything is written."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from search_worker import make_models, write_space
from typer.main import get_command
from typer.testing import CliRunner

from evomerge.cli.app import app
from evomerge.cli.search import run_resume, run_search
from evomerge.merge.method_summaries import METHOD_SUMMARIES
from evomerge.search.run import read_journal

TESTS = Path(__file__).resolve().parent
HEAVY = ("torch", "transformers", "ray", "lm_eval", "datasets", "matplotlib")

SPACE = """\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.5}}, {{name: toy_rev, weight: 0.5}}]
budget: {{max_evals: {max_evals}, popsize: 6, select_top_k: 2}}
seed: 5
worker: {{factory: "search_worker:{worker}"}}
ps: {{method: dare_ties, granularity: 2}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_models(root / "models")
    return root


def space(root: Path, *, max_evals: int = 12, worker: str = "ToyFitnessWorker") -> Path:
    return write_space(root / f"space_{max_evals}_{worker}.yaml", SPACE.format(max_evals=max_evals, worker=worker))


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}


def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli.app", *args], env=env(**extra), capture_output=True, text=True, timeout=300
    )


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)


def search_ids(run_dir: Path) -> list[str]:
    return [r["eval_id"] for r in read_journal(run_dir / "journal.jsonl") if r["phase"] == "search"]


# -- help ------------------------------------------------------------------------------------------


def all_commands() -> list[list[str]]:
    """Every command path: [], ["search"], ..., ["zoo", "build"]."""
    paths, todo = [], [([], get_command(app))]
    while todo:
        path, command = todo.pop()
        paths.append(path)
        todo += [([*path, name], sub) for name, sub in getattr(command, "commands", {}).items()]
    return sorted(paths)


def test_importing_the_cli_and_every_help_page_load_no_heavy_library():
    code = f"""
import sys
import evomerge.cli.app
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert not loaded, f"import evomerge.cli.app loaded {{loaded}}"
for path in {all_commands()!r}:
    try:
        evomerge.cli.app.app([*path, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, (path, exc.code)
    loaded = [m for m in {HEAVY!r} if m in sys.modules]
    assert not loaded, f"{{path}} --help loaded {{loaded}}"
"""
    result = python(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "evomerge")
def test_help_shows_flags_as_flags(path):
    command = get_command(app)
    for name in path:
        command = command.commands[name]
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    flags = [  # an on/off pair shows as `--x / --no-x`
        " / ".join([p.opts[0], *p.secondary_opts]) for p in command.params if getattr(p, "is_flag", False)
    ]
    for flag in [*flags, "--help"]:
        line = next(line for line in lines if line == flag or line.startswith(flag + " "))
        if line != flag:  # a long flag puts its help on the next line
            assert line[len(flag) :].startswith("  ") and not line[len(flag) :].strip().startswith("<"), line


def test_merge_help_lists_the_registry_methods_without_importing_it():
    from evomerge.merge.methods.registry import REGISTRY

    assert list(METHOD_SUMMARIES) == list(REGISTRY), (
        "evomerge/merge/method_summaries.py must list every method, in order"
    )
    assert all(METHOD_SUMMARIES.values())
    output = CliRunner().invoke(app, ["merge", "--help"], terminal_width=200).output
    for name, summary in METHOD_SUMMARIES.items():
        assert f"  {name}: {summary}\n" in output


def cli_in_fresh_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a new interpreter; stdout ends with its exit code and the heavy libraries it loaded."""
    code = f"""
import os, sys
os.chdir({str(cwd)!r})
import evomerge.cli.app
try:
    evomerge.cli.app.app({args!r})
except SystemExit as exc:
    print("exit", exc.code)
print("loaded", [m for m in {HEAVY!r} if m in sys.modules])
"""
    return python(code)


@pytest.mark.parametrize(
    "args, message",
    [
        (["merge", "missing.yaml", "out"], "error: recipe: missing.yaml does not exist"),
        (["search", "missing.yaml", "--run-dir", "run"], "error: search space: missing.yaml does not exist"),
        (["resume", "missing"], "error: run: missing is not a run directory"),
        (["report", "missing"], "error: run: missing is not a run directory"),
        (["eval", "missing"], "error: model directory missing does not exist"),
    ],
)
def test_a_missing_input_is_one_line_before_torch_is_imported(args, message, tmp_path):
    result = cli_in_fresh_process(args, tmp_path)
    assert result.stderr.strip() == message or result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "exit 2\nloaded []" in result.stdout
    assert list(tmp_path.iterdir()) == []


BAD_INPUTS = {
    "merge": (
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: .nan, density: 0.5}}]\n",
        "error: models[0].parameters.weight: must be a finite number (got nan)",
    ),
    "merge-method": ("merge_method: tie\nmodels: [{model: a}]\n", "error: merge_method: unknown method 'tie'"),
    "merge-calibration": (
        "merge_method: fisher\nmodels: [{model: a}, {model: b}]\ncalibration: {examples: 0}\n",
        "error: calibration.examples",
    ),
    "search": (
        "models: [a, b]\nbase_model: base\ntasks: [{name: toy_add}]\nps: {method: tiez}\n",
        "error: ps.method: unknown PS method 'tiez'",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_recipe_or_space_is_one_line_before_torch_is_imported(case, tmp_path):
    """Fixing a YAML by trial is quick: validation imports none of the heavy libraries."""
    text, message = BAD_INPUTS[case]
    (tmp_path / "input.yaml").write_text(text)
    args = ["merge", "input.yaml", "out"] if case.startswith("merge") else ["search", "input.yaml", "--run-dir", "r"]
    result = cli_in_fresh_process(args, tmp_path)
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "exit 2\nloaded []" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.yaml"]


# -- stopping a search -----------------------------------------------------------------------------


def test_ctrl_c_prints_the_resume_command_and_exits_130_and_that_command_finishes_the_run(root, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli.app", "search", str(space(root)), "--run-dir", str(run_dir)],
        env=env(EVOMERGE_TEST_WORKER_DELAY="0.25"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a terminal's Ctrl-C: SIGINT at its default even when pytest runs as a background job, whose
        # children inherit SIGINT ignored (Python then never raises KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 90
    while len(search_ids(run_dir)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the search did not start evaluating"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err
    assert err.splitlines()[-1] == f"interrupted: the run is saved; continue it with: evomerge resume {run_dir}"
    assert not (run_dir / "final.yaml").exists()

    command = shlex.split(err.splitlines()[-1].split("continue it with: ", 1)[1])
    assert command[:2] == ["evomerge", "resume"]
    resumed = cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert len(search_ids(run_dir)) == 12 and (run_dir / "final.yaml").exists()


def test_an_error_after_the_run_exists_ends_with_the_resume_command(root, tmp_path):
    run_dir = tmp_path / "run"
    broken = space(root, worker="UnbuildableWorker")
    result = CliRunner().invoke(app, ["search", str(broken), "--run-dir", str(run_dir), "--workers", "1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-2].startswith("error: worker.factory: cannot build 'search_worker:UnbuildableWorker'")
    assert lines[-1] == f"the run is saved; continue it with: evomerge resume {run_dir} --workers 1"
    assert (run_dir / "space.yaml").exists()


# -- the display after a resume --------------------------------------------------------------------


def test_resume_shows_its_title_what_is_journaled_and_what_is_left_before_the_worker_starts(
    root, tmp_path, capsys, monkeypatch
):
    import evomerge.search.entry

    run_dir = tmp_path / "run"
    run_search(space(root), run_dir, workers=None, ray_address=None, max_evals=None, seed=None, echo=print)
    capsys.readouterr()
    shown_at_start: list[str] = []
    make_factory = evomerge.search.entry.local_or_ray_executor

    def factory_spy(workers, ray_address):
        factory = make_factory(workers, ray_address)

        def build(*args):
            shown_at_start.append(capsys.readouterr().err)
            return factory(*args)

        return build

    monkeypatch.setattr(evomerge.search.entry, "local_or_ray_executor", factory_spy)
    run_resume(run_dir, max_evals=26, workers=None, ray_address=None, echo=print)  # 4 whole generations of 6
    header = shown_at_start[0].splitlines()[0]
    assert header == "evomerge resume: run: 12 of 24 evaluations (4 generations of 6) journaled, 12 to go"
    err = capsys.readouterr().err
    search_lines = [line for line in err.splitlines() if "phase=search" in line]
    assert "evals=13/24" in search_lines[0] and "journaled before=12" in search_lines[0]
    assert "evals=24/24" in search_lines[-1] and "to go=0" in search_lines[-1]
    assert json.loads((run_dir / "summary.json").read_text())["evaluations"] == 24


def test_resume_refuses_a_budget_below_what_is_journaled(root, tmp_path):
    run_dir = tmp_path / "run"
    run_search(space(root), run_dir, workers=None, ray_address=None, max_evals=None, seed=None, echo=print)
    before = (run_dir / "space.yaml").read_text()
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--max-evals", "8"])
    assert result.exit_code == 2
    assert "error: --max-evals: " in result.output and "pass at least 12" in result.output
    assert (run_dir / "space.yaml").read_text() == before
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--max-evals", "15"])  # 12 done, popsize 6
    assert result.exit_code == 2
    assert "not a whole number of generations (popsize 6)" in result.output and "pass 18" in result.output
    assert (run_dir / "space.yaml").read_text() == before


# -- Ray -------------------------------------------------------------------------------------------


def test_a_missing_ray_cluster_is_one_line_and_leaves_no_run_directory_and_a_resumed_one_untouched(root, tmp_path):
    """Port 1 on this host: nothing listens there (`auto` could find a stranger's cluster on a shared machine)."""
    run_dir = tmp_path / "run"
    result = cli("search", str(space(root)), "--run-dir", str(run_dir), "--ray-address", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --ray-address: ") and len(result.stderr.strip().splitlines()) == 1
    assert "ray start" in result.stderr
    assert not run_dir.exists()

    run_search(space(root), run_dir, workers=None, ray_address=None, max_evals=6, seed=None, echo=lambda *_: None)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    result = cli("resume", str(run_dir), "--max-evals", "24", "--ray-address", "127.0.0.1:1")
    assert result.returncode == 2 and result.stderr.startswith("error: --ray-address: ")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_auto_is_checked_through_ray_address_when_that_is_set(monkeypatch):
    from evomerge.workers.ray_cluster import unreachable

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert unreachable("auto").startswith("no Ray cluster answers at 127.0.0.1:1")
    assert unreachable("ray://127.0.0.1:1").startswith("no Ray cluster answers at ray://127.0.0.1:1")
    monkeypatch.delenv("RAY_ADDRESS")
    assert unreachable("auto") is None  # Ray looks for a local cluster itself


@pytest.mark.slow
def test_on_a_gpu_cluster_the_default_is_one_worker_per_gpu_and_more_are_refused_before_the_run(root, tmp_path):
    """A private Ray instance that declares one GPU (Ray only counts it; the toy worker runs on CPU)."""
    code = f"""
import logging, shutil, tempfile
from pathlib import Path
import ray
from evomerge.errors import EvomergeError
from evomerge.workers.ray_cluster import init_ray
from evomerge.search.run import read_journal
from evomerge.cli.search import run_search

temp = tempfile.mkdtemp(prefix="em-ray-")
init_ray("local", temp_dir=temp, num_cpus=2, num_gpus=1, logging_level=logging.WARNING)
space, runs = Path({str(space(root))!r}), Path({str(tmp_path)!r})
try:
    run_search(space, runs / "two", workers=2, ray_address="auto", max_evals=None, seed=None)
except EvomergeError as exc:
    print("refused:", exc)
print("two exists:", (runs / "two").exists())
run_search(space, runs / "one", workers=None, ray_address="auto", max_evals=None, seed=None, echo=lambda *_: None)
print("workers:", sorted({{r["worker"] for r in read_journal(runs / "one" / "journal.jsonl") if r["worker"]}}))
ray.shutdown()
shutil.rmtree(temp, ignore_errors=True)
"""
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert "refused: --workers: 2 workers need 2 GPUs; the cluster has 1\n" in result.stdout
    assert "two exists: False\n" in result.stdout
    assert "workers: ['ray-0']\n" in result.stdout


@pytest.mark.parametrize(
    "tasks,message",
    [
        ("[{name: toy_addd}]", "tasks[0].name: unknown lm-eval task 'toy_addd'"),
        ("[{name: toy_add, metric: accuracy}]", "tasks[0].metric: task toy_add reports exact_match, not 'accuracy'"),
    ],
)
def test_a_bad_task_or_metric_is_one_line_before_the_run_directory_exists(root, tmp_path, tasks, message):
    text = SPACE.format(max_evals=12, worker="X").replace('worker: {factory: "search_worker:X"}\n', "")
    path = write_space(
        tmp_path / "space.yaml", text.replace("[{name: toy_add, weight: 0.5}, {name: toy_rev, weight: 0.5}]", tasks)
    )
    for model in ("a", "b", "base"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / model).symlink_to(root / "models" / model)
    result = CliRunner().invoke(app, ["search", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output
    assert not (tmp_path / "run").exists()


def test_a_first_generation_that_fails_the_same_way_everywhere_stops_the_run(root, tmp_path):
    path = write_space(
        tmp_path / "space.yaml",
        SPACE.format(max_evals=12, worker="ToyFitnessWorker").replace(
            'factory: "search_worker:ToyFitnessWorker"',
            'factory: "search_worker:ToyFitnessWorker", kwargs: {fail_above: -1}',
        ),
    )
    for model in ("a", "b", "base"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / model).symlink_to(root / "models" / model)
    result = CliRunner().invoke(app, ["search", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "error: every candidate of generation 0 failed the same way" in result.output
    assert "weight above -1" in result.output
    assert len(search_ids(tmp_path / "run")) == 6  # one generation, not the whole budget


def test_resume_refuses_sources_that_changed_since_the_run_started(root, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    shutil.copytree(root / "models", models)
    path = write_space(tmp_path / "space.yaml", SPACE.format(max_evals=12, worker="ToyFitnessWorker"))
    run_dir = tmp_path / "run"
    run_search(path, run_dir, workers=None, ray_address=None, max_evals=6, seed=None, echo=lambda *_: None)
    shutil.copytree(models / "a", tmp_path / "a-copy")  # same bytes elsewhere: not a change
    weights = models / "a" / "model.safetensors"
    state = load_file(weights)
    name = sorted(state)[len(state) // 2]
    state[name] = state[name] + 0.01  # retrained in place
    save_file(state, weights, metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--max-evals", "12"])
    assert result.exit_code == 2
    assert f"error: {(models / 'a').resolve()}: this source model changed since the run started" in result.output


def test_bad_optimizer_options_fail_before_the_run_directory_exists(root, tmp_path):
    text = (
        SPACE.format(max_evals=12, worker="ToyFitnessWorker") + "optimizer: {name: cma, options: {bogus_option: 1}}\n"
    )
    path = write_space(tmp_path / "space.yaml", text)
    for model in ("a", "b", "base"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / model).symlink_to(root / "models" / model)
    result = CliRunner().invoke(app, ["search", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "error: optimizer.options: pycma rejected the options: bogus_option" in result.output
    assert "Valid options are" not in result.output and len(result.output.splitlines()) <= 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "worker,message",
    [
        (
            '{factory: "search_worker:NoSuchWorker"}',
            "error: worker.factory: cannot import 'search_worker:NoSuchWorker'",
        ),
        (
            '{factory: "search_worker:ToyFitnessWorker", kwargs: {colour: blue}}',
            "error: worker.kwargs: search_worker:ToyFitnessWorker does not take these arguments",
        ),
    ],
)
def test_a_bad_worker_factory_or_argument_fails_before_the_run_directory_exists(root, tmp_path, worker, message):
    text = SPACE.format(max_evals=12, worker="ToyFitnessWorker").replace(
        '{factory: "search_worker:ToyFitnessWorker"}', worker
    )
    path = write_space(tmp_path / "space.yaml", text)
    for model in ("a", "b", "base"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / model).symlink_to(root / "models" / model)
    result = CliRunner().invoke(app, ["search", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()
