"""User-facing errors: one line that names the field (or path) and the fix."""

from __future__ import annotations


class EvomergeError(Exception):
    """An error caused by user input; the CLI prints `error: <message>` on one line and exits non-zero.

    `hint` is an optional second line, e.g. the command that continues a run the error stopped."""

    exit_code = 2
    label = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(" ".join(message.split()))
        self.hint = hint


class Interrupted(EvomergeError):
    """Ctrl-C: not a fault of the input, but printed the same way; 130 is what shells report for SIGINT."""

    exit_code = 130
    label = "interrupted"
