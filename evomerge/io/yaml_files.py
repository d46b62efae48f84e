"""Read user YAML files safely, with one-line errors that name the file (and the line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError


def read_text(path: Path, what: str) -> str:
    """The file's text; a missing or unreadable file is a one-line error naming `what` and the path."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvomergeError(f"{what}: {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise EvomergeError(f"{what}: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise EvomergeError(f"{what}: cannot read {path}: {exc.strerror}") from None


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` (no object construction); a syntax error names the source, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise EvomergeError(f"{source}: {problem}{where}") from None
