"""The run-directory lock on its own: held, stale, and held from another machine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from evomerge.errors import EvomergeError
from evomerge.search.run_lock import LOCK_FILE, run_lock


def test_a_record_from_another_machine_is_refused_with_how_to_clear_it(tmp_path):
    record = {"pid": 4242, "host": "node-7", "command": "resume", "started": "2026-12-01T00:00:00+00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with (
        pytest.raises(EvomergeError, match=r"pid 4242 on node-7.*delete .*\.lock and resume"),
        run_lock(tmp_path, "resume"),
    ):
        pass
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == record  # left as it was


def test_a_stale_record_on_this_machine_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "search", "started": "then"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with run_lock(tmp_path, "resume"):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["command"] == "resume" and held["host"] == socket.gethostname()
    assert f"took over the lock of `evomerge search` (pid {record['pid']}" in capsys.readouterr().err
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_lock_held_by_a_live_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from evomerge.search.run_lock import run_lock\n"
            f"with run_lock(pathlib.Path({str(tmp_path)!r}), 'search'):\n"
            "    print('held', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EvomergeError, match=rf"in use by `evomerge search` \(pid {holder.pid} on"):
            with run_lock(tmp_path, "resume"):
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with run_lock(tmp_path, "resume"):  # free again once the holder has finished
        pass
