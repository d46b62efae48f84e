"""Arcee Fusion: keep the fine-tune's change only where it is important, i.e. where
|delta| x KL(softmax(fine-tune) || softmax(base)) along the last dim exceeds median + 1.5 IQR."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import MethodCall

QUANTILE_SAMPLE = 1_000_000


def importance_threshold(importance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """median + 1.5 (q3 - q1) of the scores; over a seeded sample of 1M entries when larger."""
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)
        flat = flat[picks]
    ordered = flat.sort().values
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(call: MethodCall) -> torch.Tensor:
    assert call.base is not None and call.inputs[0] is not None
    base, other = call.base, call.inputs[0]
    eps = 1e-8
    p = torch.softmax(other, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (other - base).abs() * kl
    keep = importance >= importance_threshold(importance, call.generator(0))
    return base + (other - base) * keep
