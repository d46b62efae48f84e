"""The CLI as a user meets it: help that is fast and clean, errors that come before torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.method_summaries import METHOD_SUMMARIES

TESTS = Path(__file__).resolve().parent
HEAVY = ("torch", "transformers", "ray", "lm_eval", "datasets", "matplotlib")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)


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
import evomerge.cli
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert not loaded, f"import evomerge.cli loaded {{loaded}}"
for path in {all_commands()!r}:
    try:
        evomerge.cli.app([*path, "--help"])
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
    flags = [p.opts[0] for p in command.params if getattr(p, "is_flag", False)]
    for flag in [*flags, "--help"]:
        line = next(line for line in lines if line.startswith(flag + " "))
        assert line[len(flag) :].startswith("  ") and not line[len(flag) :].strip().startswith("<"), line


def test_merge_help_lists_the_registry_methods_without_importing_it():
    from evomerge.methods.registry import REGISTRY

    assert list(METHOD_SUMMARIES) == list(REGISTRY), "evomerge/method_summaries.py must list every method, in order"
    assert all(METHOD_SUMMARIES.values())
    output = CliRunner().invoke(app, ["merge", "--help"], terminal_width=200).output
    for name, summary in METHOD_SUMMARIES.items():
        assert f"  {name}: {summary}\n" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["merge", "missing.yaml", "out"], "error: recipe: missing.yaml does not exist"),
        (["report", "missing"], "error: run: missing is not a run directory"),
    ],
)
def test_a_missing_input_is_one_line_before_torch_is_imported(args, message, tmp_path):
    code = f"""
import os, sys
os.chdir({str(tmp_path)!r})
import evomerge.cli
try:
    evomerge.cli.app({args!r})
except SystemExit as exc:
    print("exit", exc.code)
print("loaded", [m for m in {HEAVY!r} if m in sys.modules])
"""
    result = python(code)
    assert result.stderr.strip() == message or result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "exit 2\nloaded []" in result.stdout
    assert list(tmp_path.iterdir()) == []
