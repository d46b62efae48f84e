"""User-facing errors: one line that names the field (or path) and the fix."""

from __future__ import annotations

import reprlib
from typing import Any


class EvomergeError(Exception):
    """An error caused by user input; the CLI prints `error: <message>` on one line and exits non-zero.

    `hint` is an optional second line, e.g. the command that continues a run the error stopped."""

    exit_code = 2
    label = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(" ".join(message.split()))
        self.hint = hint


_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40
_SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict, _SHOWN.maxlevel = 6, 6, 4, 3


def shown(value: Any) -> str:
    """`repr(value)` cut short (long strings, huge numbers, big or deep lists elided with ...), so an
    error quotes what the user wrote without printing a megabyte of it."""
    return _SHOWN.repr(value)


class Interrupted(EvomergeError):
    """Ctrl-C: not a fault of the input, but printed the same way; 130 is what shells report for SIGINT."""

    exit_code = 130
    label = "interrupted"


_OS_FIXES = {
    "ENOSPC": "free some space (or write somewhere else) and run the command again",
    "EDQUOT": "free some of your quota (or write somewhere else) and run the command again",
    "EACCES": "check the permissions of that path, or choose another",
    "EPERM": "check the permissions of that path, or choose another",
    "EROFS": "that file system is read-only; choose a writable location",
    "ENOTDIR": "a component of that path is a file, not a folder; choose another path",
    "EEXIST": "a component of that path already exists as a file; choose another path",
    "ENOENT": "check that the path exists",
    "EIO": "the device reported an I/O error; check the disk",
}


def os_error(exc: OSError, hint: str | None = None) -> EvomergeError:
    """An operating-system failure (full disk, permissions, read-only file system, a path through a
    file) as one line naming the path, what happened and what to do; no traceback."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    where = exc.filename if exc.filename is not None else "file system"
    what = exc.strerror or type(exc).__name__
    fix = _OS_FIXES.get(name, "check the path and the disk")
    return EvomergeError(f"{where}: {what}{f' ({name})' if name else ''}; {fix}", hint=hint)
