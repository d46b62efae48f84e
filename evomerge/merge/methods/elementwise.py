"""Task-vector methods that decide element by element which models contribute: SCE (select by
variance across models, weight by energy, erase sign conflicts), RAM and RAM+ (average only where
several models moved an entry, keep unique entries whole) and NearSwap (take the other model's value
only where it is close to the base).

Semantics follow mergekit 0.1.5 (tested against it on real checkpoints); every threshold below is
mergekit's.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import MethodCall
from evomerge.merge.methods.sparsify import rank_band_mask
from evomerge.merge.methods.task_arithmetic import elected_signs


def _task_vectors(call: MethodCall) -> torch.Tensor:
    """The inputs' task vectors stacked along a new first axis (fp32, owned)."""
    assert call.base is not None
    return torch.stack([call.delta(i) for i in range(len(call.inputs))])


def sce_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Float mask of the `int(select_topk * m)` entries whose variance across models is largest,
    m = the number of entries with nonzero variance; ties at the cut are kept by index (stable)."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False).reshape(-1)
    k = int(int(torch.count_nonzero(variance)) * select_topk) if select_topk > 0 else 0
    n = variance.numel()
    return rank_band_mask(variance, n - k, n).to(deltas.dtype).reshape(deltas.shape[1:])


def sce(call: MethodCall) -> torch.Tensor:
    """SCE (FuseChat, arXiv 2408.07990): Select the entries that vary most across models
    (`select_topk`), Calculate each model's weight as the mean square of its selected task vector
    (normalised to sum 1), Erase entries whose sign disagrees with the elected (TIES sum) sign; the
    result is the weighted mean of the surviving entries, added to the base."""
    assert call.base is not None
    deltas = _task_vectors(call)
    deltas *= sce_mask(deltas, float(call.params.get("select_topk", 1.0)))
    energy = deltas.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1.0 / len(deltas)) if abs(total) < 1e-6 else energy / total
    elected = elected_signs(list(deltas), "sum")
    agree = (deltas.sign() == elected).to(deltas.dtype)  # zeros never agree
    kept = agree * weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    merged = (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return call.base + merged


def _ram_parts(call: MethodCall, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task vectors zeroed where |delta| <= epsilon, which of them count, how many count per entry)."""
    deltas = _task_vectors(call)
    counts_here = deltas.abs() > epsilon
    deltas *= counts_here
    return deltas, counts_here, counts_here.sum(dim=0)


def ram(call: MethodCall) -> torch.Tensor:
    """RAM (Reinforced Agent Merging, arXiv 2601.13572): an entry moved (|delta| > epsilon) by one
    model takes that model's change whole; one moved by several takes their mean; entries no model
    moved keep the base. Unlike a plain average, unique skills are not diluted."""
    assert call.base is not None
    deltas, _, counts = _ram_parts(call, float(call.params.get("epsilon", 1e-5)))
    share = torch.where(counts > 1, 1.0 / counts.clamp(min=1), (counts == 1).to(deltas.dtype))
    return call.base + deltas.sum(dim=0) * share


def ramplus_tl(call: MethodCall) -> torch.Tensor:
    """RAM+ with per-tensor statistics: as RAM, but each model's unique entries are amplified by
    `1 + r * min(alpha, shared_i / unique_i)`, where shared_i / unique_i count that model's moved
    entries that overlap another model's and that are its alone, within this tensor."""
    assert call.base is not None
    epsilon = float(call.params.get("epsilon", 1e-5))
    r, alpha = float(call.params.get("r", 0.1)), float(call.params.get("alpha", 0.2))
    deltas, counts_here, counts = _ram_parts(call, epsilon)
    overlap, unique = counts > 1, counts == 1
    dims = tuple(range(1, deltas.dim()))
    shared_i = (counts_here & overlap).sum(dim=dims).to(deltas.dtype)
    unique_i = (counts_here & unique).sum(dim=dims).to(deltas.dtype)
    boost = 1 + r * (shared_i / unique_i.clamp(min=epsilon)).clamp(min=0, max=alpha)
    boost = boost.reshape(-1, *([1] * (deltas.dim() - 1)))
    per_model = deltas * (unique * boost + overlap / counts.clamp(min=1))
    return call.base + per_model.sum(dim=0)


def nearswap(call: MethodCall) -> torch.Tensor:
    """NearSwap: move each entry of the base toward the other model by the fraction
    `min(1, t / |a - b|)`, so entries that differ by at most t take the other model's value and
    distant ones barely move."""
    assert call.base is not None and call.inputs[0] is not None
    a, b = call.base, call.inputs[0]
    weight = (float(call.params["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a
