"""User-facing errors: one line that names the field (or path) and the fix."""

from __future__ import annotations


class EvomergeError(Exception):
    """An error caused by user input; the CLI prints its message on one line and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
