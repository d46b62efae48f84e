"""Search spaces: PS genes, DFS paths, decoding a genome into an ordinary merge recipe.

The configuration (`config`) imports without torch, so a bad space is reported at once; the
decoding side (`space`, `dfs`) loads on first access."""

from typing import Any

from evomerge.search.space.config import SpaceConfig, dump_space_config, load_space_config, parse_space

_LAZY = {
    "Gene": "genes",
    "SearchSpace": "space",
    "default_popsize": "space",
    "load_space": "space",
    "Step": "dfs",
    "path_from_recipe": "dfs",
    "path_to_recipe": "dfs",
}

__all__ = ["SpaceConfig", "dump_space_config", "load_space_config", "parse_space", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"evomerge.search.space.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
