"""Operating-system faults end in one line naming the path and the fix, with the previous state
intact: a full disk in the middle of a merge or of a search, an output path through a file. The
faults are injected (a full disk cannot be made portably without privileges to mount a tmpfs)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from search_worker import make_models, write_space
from test_search_kill import BASE, journals
from typer.testing import CliRunner

from evomerge.cli.app import app
from evomerge.io import checkpoint
from evomerge.search import run as run_module

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def one_error_line(output: str) -> str:
    """The one `error:` line (a search prints its progress lines before it), and no traceback."""
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def merge_recipe(tmp_path: Path, zoo: dict[str, Path]) -> Path:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['ft1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {zoo['ft2']}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    )
    return recipe


def test_a_full_disk_during_a_merge_is_one_line_and_leaves_nothing(tmp_path, llama_zoo, monkeypatch):
    written = []
    original = checkpoint.StreamingShardWriter.write

    def fill_up(self, name, tensor):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        written.append(name)
        original(self, name, tensor)

    monkeypatch.setattr(checkpoint.StreamingShardWriter, "write", fill_up)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(merge_recipe(tmp_path, llama_zoo)), str(out), "--quiet"])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "No space left on device (ENOSPC); free some space" in line and ".safetensors" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_output_path_through_a_file_is_one_line(tmp_path, llama_zoo):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "merged"
    result = CliRunner().invoke(app, ["merge", str(merge_recipe(tmp_path, llama_zoo)), str(out), "--quiet"])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "notes.txt" in line and ("ENOTDIR" in line or "EEXIST" in line)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_full_disk_during_a_search_stops_resumably_and_resume_is_exact(tmp_path, monkeypatch):
    make_models(tmp_path / "models")
    space = write_space(tmp_path / "space.yaml", BASE.replace("LOG", str(tmp_path / "worker.log")))
    runner = CliRunner()
    reference = tmp_path / "reference"
    assert runner.invoke(app, ["search", str(space), "--run-dir", str(reference)]).exit_code == 0

    appended = []
    original = run_module.Journal.append

    def fill_up(self, record):
        if len(appended) == 9:  # half a line reaches the disk, then the disk is full
            self._handle.write(json.dumps(record)[:20])
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        appended.append(record["eval_id"])
        original(self, record)

    monkeypatch.setattr(run_module.Journal, "append", fill_up)
    run = tmp_path / "run"
    result = runner.invoke(app, ["search", str(space), "--run-dir", str(run)])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "journal.jsonl: No space left on device (ENOSPC)" in line
    assert f"continue it with: evomerge resume {run}" in result.output
    monkeypatch.setattr(run_module.Journal, "append", original)  # space freed
    resumed = runner.invoke(app, ["resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert journals(run) == journals(reference)
    assert (run / "final.yaml").read_text() == (reference / "final.yaml").read_text()


@pytest.mark.parametrize("code", ["EACCES", "EROFS"])
def test_other_os_faults_name_the_path_and_the_fix(code, tmp_path, llama_zoo, monkeypatch):
    from evomerge.io import checkpoint as io_checkpoint

    def refuse(*args, **kwargs):
        raise OSError(getattr(errno, code), "refused", str(tmp_path / "out"))

    monkeypatch.setattr(io_checkpoint.AtomicDirectory, "__init__", refuse)
    result = CliRunner().invoke(
        app, ["merge", str(merge_recipe(tmp_path, llama_zoo)), str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert f"({code})" in line and str(tmp_path / "out") in line
    assert ("permissions" if code == "EACCES" else "read-only") in line
