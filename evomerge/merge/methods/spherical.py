"""Interpolation on the sphere of more general kinds than `slerp`: NuSLERP (two weighted models,
per row or per tensor, optionally on task vectors), Multi-SLERP (any number of models, through a
tangent space) and the Karcher mean (the Riemannian centre of mass, by fixed-point iteration).

All three interpolate directions and restore a weighted mean of the norms, so a merge does not
shrink weights the way a linear average of diverging models does. Semantics follow mergekit 0.1.5
exactly, degenerate inputs included (tested against it on real checkpoints).
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import MethodCall

NUSLERP_EPS = 1e-8  # colinear when sin^2 of the angle is at most eps^2
NUSLERP_NORM_FLOOR = 1e-7  # a vector shorter than this is not normalised (stays ~0)


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True
) -> torch.Tensor:
    """SLERP from v0 (t = 0) to v1 (t = 1) of the flattened tensors (`flatten`), or of each
    vector along the last dim (along dim 0 with `row_wise`); lerp where a pair is colinear.

    A zero vector has no direction: its cosine is taken as 0, so it slerps at a right angle
    (mergekit's convention, kept for parity)."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(call: MethodCall) -> torch.Tensor:
    """Two models with weights w1, w2: t = w2 / (w1 + w2) (0.5 when the sum is ~0). With a base,
    the two task vectors are slerped and added to it."""
    first, second = call.inputs
    assert first is not None and second is not None
    w1, w2 = (float(p["weight"]) for p in call.input_params)
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    row_wise = bool(call.params.get("nuslerp_row_wise", False))
    flatten = bool(call.params.get("nuslerp_flatten", True))
    if call.base is None:
        return nuslerp_tensors(t, first, second, row_wise=row_wise, flatten=flatten)
    base = call.base
    return base + nuslerp_tensors(t, first - base, second - base, row_wise=row_wise, flatten=flatten)


def multislerp(call: MethodCall) -> torch.Tensor:
    """Barycentric interpolation on the unit sphere: project the unit directions onto the tangent
    space at their weighted mean direction, average there, map back with the exponential map, and
    scale by the weighted mean norm (on task vectors when there is a base)."""
    tensors = [x for x in call.inputs if x is not None]
    if len(tensors) == 1:
        return tensors[0].clone()  # mergekit returns the single model as is, base or not
    eps = float(call.params.get("eps", 1e-8))
    weights = torch.tensor([float(p["weight"]) for p in call.input_params], dtype=tensors[0].dtype)
    weights = weights.to(tensors[0].device)
    if call.params.get("normalize_weights", True):
        weights = weights / weights.sum()  # the planner rejects weights summing to 0 here
    stacked = torch.stack(tensors)
    if call.base is not None:
        stacked -= call.base
    flat = stacked.reshape(len(tensors), -1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2 or bool((norms < eps).all()):
            # two antipodal directions, or nothing moved at all: the weighted sum is the answer
            linear = (flat * weights[:, None]).sum(0).reshape(stacked.shape[1:])
            return linear if call.base is None else linear + call.base
        raise EvomergeError(
            f"{call.tensor_name}: multislerp: the weighted mean direction of the inputs is zero "
            "(antipodal inputs whose weights balance out); change the weights"
        )
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights[:, None]).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * weights).sum()).reshape(stacked.shape[1:])
    return result if call.base is None else result + call.base


def karcher_mean(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Equal-weight Karcher (Frechet) mean of the directions on the unit sphere, by at most
    `max_iter` Riemannian gradient steps from the normalised Euclidean mean, times the mean norm.

    Tensors with norm <= tol have no direction and do not pull on the mean, but their (tiny) norm
    still counts in the mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    directions = [x.reshape(-1) / n for x, n in zip(tensors, norms, strict=True) if float(n) > tol]
    if not directions:
        return torch.zeros_like(tensors[0])
    weight = 1.0 / len(directions)
    mean = sum(weight * u for u in directions)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = directions[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in directions:
            cos = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (u - cos * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        norm = torch.linalg.vector_norm(mean)
        if float(norm) > tol:
            mean = mean / norm
    scale = sum(alpha * n for n in norms)
    return (scale * mean).reshape(tensors[0].shape)


def karcher(call: MethodCall) -> torch.Tensor:
    """Every input counts equally; a `base_model` missing from `models:` is one of the inputs
    (base policy "input", as in mergekit)."""
    tensors = [x for x in call.inputs if x is not None]
    return karcher_mean(tensors, int(call.params.get("max_iter", 10)), float(call.params.get("tol", 1e-5)))
