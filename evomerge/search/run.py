"""The run directory: resolved space, append-only journal, best/final recipes.

    runs/NAME/space.yaml        the resolved search space (absolute paths, popsize, seed)
    runs/NAME/journal.jsonl     one JSON object per evaluation, flushed and fsynced per line
    runs/NAME/run.json          format version, the space's identity and the sources' fingerprints (what resume checks)
    runs/NAME/best.yaml         best recipe by search fitness so far
    runs/NAME/final.yaml        the chosen recipe (selection split), at the end
    runs/NAME/summary.json      report-split scores of the final recipe and the sources
    runs/NAME/pareto.json       the Pareto front, in runs with objectives (evomerge/search/objectives.py)
    runs/NAME/study.log         the optuna study (optuna optimizer), rebuilt from the journal on every start
    runs/NAME/.lock             held by the one process running the search (search/run_lock.py)

The journal is the run: resuming replays it through a fresh optimizer (evomerge/search/driver.py), so no
optimizer state is saved and nothing in a run directory is ever unpickled. Every file except the
journal is replaced atomically (temp file + fsync + os.replace); the journal only grows, and a line
cut short by a kill is dropped on the next open.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.io.file_modes import file_mode
from evomerge.search.run_lock import LOCK_FILE

SPACE_FILE = "space.yaml"
JOURNAL_FILE = "journal.jsonl"
RUN_FILE = "run.json"
BEST_FILE = "best.yaml"
FINAL_FILE = "final.yaml"
SUMMARY_FILE = "summary.json"
PARETO_FILE = "pareto.json"
RUN_FORMAT = 1  # of run.json


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `path` so that readers see the old or the new content, never a mix; its mode follows
    the umask (mkstemp alone would leave 0600)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """Append-only JSONL; each record is on disk (fsync) before `append` returns."""

    def __init__(self, path: Path):
        self.path = path
        self._drop_torn_tail()
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def _drop_torn_tail(self) -> None:
        """A SIGKILL mid-write can leave a last line without its newline: cut it off."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=False, allow_nan=False)
        self._handle.write(line + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def records(self) -> list[dict[str, Any]]:
        return list(read_journal(self.path))

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                return  # torn last line
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise EvomergeError(f"{path}: line {number} is not valid JSON; the journal is damaged") from None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def space_file(self) -> Path:
        return self.file(SPACE_FILE)

    @property
    def journal_file(self) -> Path:
        return self.file(JOURNAL_FILE)

    def exists(self) -> bool:
        return self.space_file.exists()

    def check_new(self) -> None:
        """A new run needs an absent or empty folder (a run is never silently overwritten)."""
        if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise EvomergeError(
                f"--run-dir: {self.path} already holds a run; use `evomerge resume {self.path}` or choose a new folder"
            )

    def create(self) -> None:
        self.check_new()
        self.path.mkdir(parents=True, exist_ok=True)

    def require(self) -> None:
        if not self.exists():
            raise EvomergeError(
                f"run: {self.path} is not a run directory (no {SPACE_FILE}); start one with `evomerge search`"
            )

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.file(name), text)

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.file(name), json.dumps(data, indent=2, sort_keys=False) + "\n")

    def read_json(self, name: str) -> Any:
        """The JSON document `name`, or None when the run has no such file."""
        path = self.file(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise EvomergeError(f"{path}: not valid JSON; the run directory is damaged") from None

    def open_journal(self) -> Journal:
        return Journal(self.journal_file)
