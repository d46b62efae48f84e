"""Merge methods: one small module per family, one registry (`evomerge.merge.methods.registry`).

Importing the package or the registry does not import torch (recipes are validated without it);
the tensor-level names (`DeltaCache`, `MethodCall`, ...) load `base` on first access."""

from typing import Any

from evomerge.merge.methods.registry import REGISTRY, get_method, method_names
from evomerge.merge.methods.spec import MergeMethod, ParamSpec

_FROM_BASE = ("DeltaCache", "MethodCall", "make_generator", "tensor_seed")

__all__ = ["REGISTRY", "MergeMethod", "ParamSpec", "get_method", "method_names", *_FROM_BASE]


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from evomerge.merge.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
