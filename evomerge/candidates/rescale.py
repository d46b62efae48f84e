"""mergekit's L1 rescaling (`rescale_norm: l1`, the default of DARE and DELLA) for the fused and
flat kernels, bit-identical to `sparsify.rescale_l1`.

The eager method scales the kept entries by `before / after`, `before = |delta|.sum()` and
`after = |delta * keep|.sum()`. `before` is a property of the resident task vector (computed once);
`after` needs this candidate's mask, so one pass writes `|delta * keep|` with the kernel's own keep
factor into a scratch tensor and ATen sums it: the same values reduced by the same code in the
same order as the eager method, hence the same float. The kernel then applies the ratio.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

L1_EPS = 1e-7  # sparsify.rescale_l1's default


def kept_abs(
    out: torch.Tensor, delta: torch.Tensor, draws: torch.Tensor, ranks: torch.Tensor | None, cut, slope
) -> None:
    """|delta * keep| with `_kernel`'s DARE (`ranks` None) or DELLA keep factor: the tensor whose
    sum is `sparsify.rescale_l1`'s `after`. Summed by ATen afterwards (`l1_ratio`), so the
    reduction is the eager one, bit for bit; this only saves the eager method's extra passes."""
    probs = cut if ranks is None else cut + slope * ranks.to(torch.float32)
    keep = (draws - probs).floor().neg()
    out.copy_((delta * keep).abs())


def l1_ratio(before: torch.Tensor, kept_abs: torch.Tensor) -> float | None:
    """`rescale_l1`'s factor before / after (1.0 where it leaves the entries as they are), from
    `before` = |delta|.sum() and the kept magnitudes; None when `before` is not finite (NaN or inf
    deltas: the eager method's products with 0 would differ from the kernel's)."""
    if not bool(torch.isfinite(before)):
        return None
    after = kept_abs.sum()
    if bool(before < L1_EPS) or bool(after < L1_EPS):
        return 1.0
    return float(before / after)


class L1Ratios:
    """Per-input L1 factors of one job; keeps `before` per resident task vector and the compiled
    `kept_abs`."""

    def __init__(self) -> None:
        self._kept_abs: Callable[..., None] | None = None
        self._abs_sums: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(delta) -> (delta, |delta|.sum())

    def abs_sum(self, delta: torch.Tensor) -> torch.Tensor:
        """|delta|.sum() as `rescale_l1` computes it, once per resident task vector."""
        key = id(delta)
        held = self._abs_sums.get(key)
        if held is not None and held[0]() is delta:
            return held[1]
        total = delta.abs().sum()
        self._abs_sums = {k: v for k, v in self._abs_sums.items() if v[0]() is not None}
        self._abs_sums[key] = (weakref.ref(delta), total)
        return total

    def ratios(
        self,
        deltas: Sequence[torch.Tensor],
        draws: Sequence[torch.Tensor],
        ranks: Sequence[torch.Tensor],
        cuts: Sequence[float],
        slopes: Sequence[float],
    ) -> list[float] | None:
        """Per input the L1 factor of `rescale_l1` (None: run the eager method). A cut of 1 or
        more (density 1) drops nothing, and the eager method does not rescale then."""
        if self._kept_abs is None:
            self._kept_abs = torch.compile(kept_abs, dynamic=True, fullgraph=True)
        out = []
        for i, delta in enumerate(deltas):
            if cuts[i] >= 1.0:
                out.append(1.0)
                continue
            kept = torch.empty_like(delta)
            cut = torch.tensor(cuts[i], dtype=torch.float32, device=kept.device)
            slope = torch.tensor(slopes[i], dtype=torch.float32, device=kept.device)
            self._kept_abs(kept, delta, draws[i], ranks[i] if ranks else None, cut, slope)
            ratio = l1_ratio(self.abs_sum(delta), kept)
            if ratio is None:
                return None
            out.append(ratio)
        return out
