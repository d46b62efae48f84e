"""Where the project's bundled resources live (tasks/, search_spaces/, zoo/)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # evomerge/io/paths.py -> the repository


def tasks_dir() -> Path:
    """The bundled lm-eval task folder; EVOMERGE_TASKS_DIR overrides it."""
    return Path(os.environ.get("EVOMERGE_TASKS_DIR", REPO_ROOT / "tasks"))


def search_spaces_dir() -> Path:
    return REPO_ROOT / "search_spaces"


def shipped_zoo(mini: bool = False) -> Path:
    """The toy zoo committed to the repository (seed 0): zoo/toy for the demo, zoo/mini for tests."""
    return REPO_ROOT / "zoo" / ("mini" if mini else "toy")
