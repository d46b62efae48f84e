"""Per-tensor steps of `rebasin` and `repair`: interpolate A with B permuted into A's basis, then
apply the REPAIR fold of this tensor. The permutation and the folds come from the model-level
pre-pass (evomerge.merge.data_aware.prepare) through `MethodCall.context`."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import MethodCall


def _interpolated(call: MethodCall) -> torch.Tensor:
    from evomerge.merge.data_aware.prepare import interpolate

    if call.context is None:
        raise RuntimeError(f"{call.tensor_name}: merged without the alignment pre-pass")
    assert call.base is not None and call.inputs[0] is not None
    aligned = call.context.align(0, call.inputs[0])
    return interpolate(call.base, aligned, float(call.input_params[0]["t"]))


def rebasin(call: MethodCall) -> torch.Tensor:
    """(1 - t) A + t pi(B): t = 0 gives A, t = 1 gives B in A's basis."""
    return _interpolated(call)


def repair(call: MethodCall) -> torch.Tensor:
    """The (optionally re-based) interpolation with REPAIR's rescaling folded in."""
    result = _interpolated(call)
    fold = call.context.fold
    return result if fold is None else fold.apply(result)
