"""One process per run directory: `search` and `resume` hold `RUN/.lock` while they run.

The lock is an `flock` on that file, so the kernel releases it when the holder dies (kill -9
included) and a crashed run never blocks the next resume on the same machine. The file also names
the holder (pid, host, command, start time) for the message a second process prints. Where the run
directory is on a filesystem that does not share `flock` between machines, a record left by a live
or crashed process on another host is not something this host can check: that is refused too, with
the command that clears it. Workers never touch the run directory; only the driver process does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.io.file_modes import file_mode

LOCK_FILE = ".lock"


def _holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        record = json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another evomerge process"
    return (
        f"`evomerge {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')})"
    )


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run directory for this process, or fail with one line naming the holder."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as exc:
        raise EvomergeError(
            f"{path}: cannot create the run lock ({exc.strerror}); check the folder's permissions"
        ) from (None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            where = f" on {holder['host']}" if holder and holder.get("host") else ""
            pid = f" {holder['pid']}" if holder and holder.get("pid") else ""
            raise EvomergeError(
                f"{run_dir}: in use by {_describe(holder)}; wait for it to finish or stop it (kill{pid}{where}), "
                "then resume",
                hint="",  # no "continue it with" line: the holder is running it
            ) from None
        host = socket.gethostname()
        holder = _holder(fd)
        if holder and holder.get("pid") != os.getpid():
            if holder.get("host") != host:
                raise EvomergeError(
                    f"{run_dir}: {LOCK_FILE} names {_describe(holder)}, on another machine this one cannot check; "
                    f"if no evomerge runs there on this run, delete {path} and resume",
                    hint="",
                )
            # same host and the flock was free: the kernel released it, so that process has ended
            note = f"note: {run_dir}: took over the lock of {_describe(holder)}, which is no longer running"
            print(note, file=sys.stderr)
        record = {
            "pid": os.getpid(),
            "host": host,
            "command": command,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: the next process finds no holder to report
    finally:
        os.close(fd)  # closing drops the flock
