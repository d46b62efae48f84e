"""The task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All share one shape: task vectors `delta_i = theta_i - theta_base` (computed in fp32, a deliberate
difference from mergekit, which subtracts in the base's dtype), an optional sparsifier per task
vector, weights, an optional TIES sign election, an optional normalisation by the (agreeing)
weights, a global `lambda`, and `base + result`.
"""

from __future__ import annotations

from typing import Literal

import torch

from evomerge.merge.methods.base import MethodCall
from evomerge.merge.methods.sparsify import bernoulli_drop, della_magprune, magnitude_band, magnitude_topk

Sparsifier = Literal["magnitude", "band", "bernoulli", "della"] | None
Consensus = Literal["sum", "count"] | None


def sparsified_delta(call: MethodCall, i: int, sparsifier: Sparsifier, scale: float = 1.0) -> torch.Tensor:
    """Task vector i after its sparsifier (with that input's density/gamma/epsilon), times
    `scale`, as a tensor the caller owns and may modify in place."""
    delta, owned = call.take_delta(i)
    p = call.input_params[i]
    density = float(p.get("density", 1.0))
    if sparsifier is None or density >= 1:
        # every sparsifier keeps everything at density 1 (Breadcrumbs' gamma included)
        if scale != 1.0:
            return delta.mul_(scale) if owned else delta * scale
        return delta if owned else delta.clone()
    rescale = bool(call.params.get("rescale", False))
    norm = str(call.params.get("rescale_norm", "l1"))
    cache = call.cache(i)
    if sparsifier == "magnitude":
        return magnitude_topk(
            delta, density, sorted_abs=cache and cache.sorted_abs, rescale=rescale, inplace=owned, scale=scale
        )
    if sparsifier == "band":
        return magnitude_band(
            delta,
            density,
            float(p.get("gamma", 0.01)),
            sorted_abs=cache and cache.sorted_abs,
            rescale=rescale,
            inplace=owned,
            scale=scale,
        )
    if sparsifier == "bernoulli":
        return bernoulli_drop(
            delta, density, call.generator(i), rescale=rescale, rescale_norm=norm, inplace=owned, scale=scale
        )
    if sparsifier == "della":
        return della_magprune(
            delta,
            density,
            float(p.get("epsilon", 0.15)),
            call.generator(i),
            row_ranks=cache and cache.row_ranks,
            rescale=rescale,
            rescale_norm=norm,
            inplace=owned,
            scale=scale,
        )
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def elected_signs(weighted: list[torch.Tensor], consensus: str) -> torch.Tensor:
    """TIES election as +1.0 / -1.0: the sign of the total (`sum`) or of the vote count
    (`count`); an exact tie elects +1."""
    if consensus == "sum":
        score = _sum(weighted)
    else:
        score = torch.zeros_like(weighted[0])
        for w in weighted:
            score += torch.sign(w)
    # sign(x) + 0.5 is -0.5, 0.5 or 1.5, so its sign maps 0 to +1 (float ops; no boolean masks)
    return score.sign_().add_(0.5).sign_()


def generalized_task_arithmetic(call: MethodCall, sparsifier: Sparsifier, consensus: Consensus) -> torch.Tensor:
    """Sums run in input order (bit-for-bit the same sums as mergekit's), in place where possible:
    peak memory is the inputs plus about three tensors."""
    if call.base is None:
        raise RuntimeError(f"{call.tensor_name}: task-vector methods need the base tensor")
    count = len(call.inputs)
    weights = [float(call.input_params[i]["weight"]) for i in range(count)]
    weighted = []
    for i in range(count):
        weighted.append(sparsified_delta(call, i, sparsifier, scale=weights[i]))
    normalize = bool(call.params.get("normalize", False))
    if consensus is not None:
        # In place, without masks or sign tensors: with elected = +1/-1, max(w * elected, 0) * elected
        # is w where its sign agrees and 0 elsewhere (zeros never agree); the agreeing entries are
        # then exactly the nonzero ones.
        elected = elected_signs(weighted, consensus)
        divisor = torch.zeros_like(weighted[0]) if normalize else None
        for w_delta, w in zip(weighted, weights, strict=True):
            w_delta.mul_(elected).clamp_(min=0).mul_(elected)
            if divisor is not None:
                divisor.add_(w_delta.ne(0), alpha=w)
        del elected
        mixed = _sum_into_first(weighted)
        if divisor is not None:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    else:
        mixed = _sum_into_first(weighted)
        total = sum(weights)
        if normalize:
            mixed.div_(1.0 if abs(total) < 1e-8 else total)
    scale = float(call.params.get("lambda", 1.0))
    if scale != 1.0:
        mixed.mul_(scale)
    return mixed.add_(call.base)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise sum in order, without stacking (one extra tensor of memory, not k)."""
    total = torch.add(tensors[0], tensors[1]) if len(tensors) > 1 else tensors[0].clone()
    for t in tensors[2:]:
        total += t
    return total


def _sum_into_first(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise sum in order, accumulated in the first (owned) tensor."""
    total = tensors[0]
    for t in tensors[1:]:
        total += t
    return total


def task_arithmetic(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, None, None)


def ties(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "magnitude", call.params.get("consensus", "sum"))


def dare_ties(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "bernoulli", call.params.get("consensus", "sum"))


def dare_linear(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "bernoulli", None)


def breadcrumbs(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "band", None)


def breadcrumbs_ties(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "band", call.params.get("consensus", "sum"))


def della(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "della", call.params.get("consensus", "sum"))


def della_linear(call: MethodCall) -> torch.Tensor:
    return generalized_task_arithmetic(call, "della", None)
