"""Weighted averaging (model soups) and pass-through (layer stacking, per-tensor scale)."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import MethodCall


def linear(call: MethodCall) -> torch.Tensor:
    """`sum(w_i x_i)`, divided by `sum(w_i)` when `normalize` (default true)."""
    result: torch.Tensor | None = None
    total = 0.0
    for tensor, p in zip(call.inputs, call.input_params, strict=False):
        assert tensor is not None
        w = float(p["weight"])
        total += w
        result = tensor * w if result is None else result.add_(tensor, alpha=w)
    assert result is not None
    if call.params.get("normalize", True):
        # The planner rejects weights summing to zero before any tensor is read.
        result = result / total
    return result


def passthrough(call: MethodCall) -> torch.Tensor:
    """The single input, times `scale` when one is set for this tensor."""
    (tensor,) = call.inputs
    assert tensor is not None
    scale = call.input_params[0].get("scale")
    return tensor if scale is None else tensor * float(scale)
