"""Spherical linear interpolation between the base (t = 0) and one other model (t = 1)."""

from __future__ import annotations

import math

import torch

from evomerge.merge.methods.base import MethodCall

COLINEAR_DOT = 0.9995
ZERO_NORM = 1e-8


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Coefficients from the angle between the flattened, normalised tensors, applied to the raw
    tensors. Falls back to lerp when |cos| > 0.9995 (nearly colinear or anti-parallel) and when
    either tensor has (near) zero norm, where the angle is undefined."""
    if t == 0:
        return v0.clone()
    if t == 1:
        return v1.clone()
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    if float(n0) <= ZERO_NORM or float(n1) <= ZERO_NORM:
        return torch.lerp(v0, v1, t)
    dot = float(torch.dot((v0 / n0).reshape(-1), (v1 / n1).reshape(-1)).clamp(-1.0, 1.0))
    if abs(dot) > COLINEAR_DOT:
        return torch.lerp(v0, v1, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    c0 = math.sin((1 - t) * theta) / sin_theta
    c1 = math.sin(t * theta) / sin_theta
    return v0 * c0 + v1 * c1


def slerp(call: MethodCall) -> torch.Tensor:
    assert call.base is not None and len(call.inputs) == 1 and call.inputs[0] is not None
    return slerp_tensors(float(call.params["t"]), call.base, call.inputs[0])
