"""Model Stock: move from the base toward the average of the fine-tunes by a ratio t that comes
from the angle between their task vectors (per tensor, or per row with `filter_wise`).

As in mergekit (and the paper's formula) t is not clamped: fine-tunes whose task vectors point apart
(cos < 0) extrapolate away from their mean. `clamp_t: true` opts into t in [0, 1]."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import MethodCall


def interpolation_ratio(deltas: list[torch.Tensor], clamp: bool) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos), cos = mean pairwise cosine of the rows of `deltas`."""
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp_min(1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    return t.clamp(0.0, 1.0) if clamp else t


def model_stock(call: MethodCall) -> torch.Tensor:
    assert call.base is not None
    base = call.base
    shape = base.shape
    # filter_wise: one ratio per vector along the last dim (a 1-D tensor is one vector), as mergekit
    if call.params.get("filter_wise", False):
        rows = base.reshape(1, -1) if base.dim() <= 1 else base
    else:
        rows = base.reshape(-1)
    fine_tunes = [x.reshape(rows.shape) for x in call.inputs if x is not None]
    deltas = [x - rows for x in fine_tunes]
    t = interpolation_ratio(deltas, clamp=bool(call.params.get("clamp_t", False)))
    average = sum(fine_tunes) / len(fine_tunes)
    return (t * average + (1 - t) * rows).reshape(shape)
