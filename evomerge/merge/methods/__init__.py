"""Merge methods: one small module per family, one registry (`evomerge.merge.methods.registry`)."""

from evomerge.merge.methods.base import DeltaCache, MergeMethod, MethodCall, ParamSpec, make_generator, tensor_seed
from evomerge.merge.methods.registry import REGISTRY, get_method, method_names

__all__ = [
    "REGISTRY",
    "DeltaCache",
    "MergeMethod",
    "MethodCall",
    "ParamSpec",
    "get_method",
    "make_generator",
    "method_names",
    "tensor_seed",
]
