"""Sparsifiers of task vectors: magnitude top-k (TIES), magnitude band (Breadcrumbs), Bernoulli
(DARE) and rank-dependent Bernoulli (DELLA's MagPrune).

Ranks are ascending by |delta| with ties broken by flat index (a stable sort), so results are
exactly defined. Selections avoid a full sort: a k-th value plus threshold compares, or a lookup
in a precomputed `sorted_abs` (see `DeltaCache`) when the caller has one.
"""

from __future__ import annotations

import threading

import torch


def stable_row_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """Ascending 0-based rank of each entry within its row (rows = dim 0; 1-D = one row)."""
    rows = _as_rows(magnitudes)
    order = torch.sort(rows, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
    return ranks.reshape(magnitudes.shape)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def _kth_smallest(flat_abs: torch.Tensor, rank: int, sorted_abs: torch.Tensor | None) -> torch.Tensor:
    """Value with 0-based ascending rank `rank` (exact)."""
    if sorted_abs is not None:
        return sorted_abs[rank]
    if flat_abs.numel() >= SAMPLED_SELECTION_MIN:
        value = _kth_by_sampling(flat_abs, rank)
        if value is not None:
            return value
    return torch.kthvalue(flat_abs, rank + 1).values


SAMPLED_SELECTION_MIN = 1 << 20
_SAMPLE = 1 << 16


def _kth_by_sampling(flat: torch.Tensor, rank: int) -> torch.Tensor | None:
    """Exact k-th value via a bracket from a strided sample: count what lies below the bracket,
    select inside it. None when the bracket misses (then the caller does a full selection)."""
    n = flat.numel()
    sample = flat[:: max(1, n // _SAMPLE)].sort().values
    m = sample.numel()
    centre = rank / max(1, n - 1) * (m - 1)
    spread = 6.0 * m**0.5 + 2  # about 12 standard deviations of the sample quantile
    low = sample[max(0, int(centre - spread))]
    high = sample[min(m - 1, int(centre + spread) + 1)]
    below = int(torch.count_nonzero(flat < low))
    inside = flat[(flat >= low) & (flat <= high)]
    offset = rank - below
    if not 0 <= offset < inside.numel():
        return None
    return torch.kthvalue(inside, offset + 1).values


def rank_band_mask(flat_abs: torch.Tensor, lo: int, hi: int, sorted_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of entries whose stable ascending rank lies in `[lo, hi)`."""
    n = flat_abs.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return torch.zeros_like(flat_abs, dtype=torch.bool)
    if lo == 0 and hi == n:
        return torch.ones_like(flat_abs, dtype=torch.bool)
    # Bounds only where the band has an edge: a top-k needs one order statistic, not two.
    v_lo = _kth_smallest(flat_abs, lo, sorted_abs) if lo > 0 else None
    v_hi = _kth_smallest(flat_abs, hi - 1, sorted_abs) if hi < n else None
    if v_lo is not None and v_hi is not None:
        mask = (flat_abs >= v_lo) & (flat_abs <= v_hi)
    elif v_lo is not None:
        mask = flat_abs >= v_lo
    else:
        mask = flat_abs <= v_hi
    if int(torch.count_nonzero(mask)) == hi - lo:
        return mask  # no equal magnitudes straddle an edge: the inclusive band is exact
    # Equal magnitudes at an edge: they take consecutive ranks in index order.
    if v_hi is None or v_lo is None:
        return _one_edge_with_ties(flat_abs, lo, hi, v_lo, v_hi)
    if v_lo is not None and v_hi is not None:
        mask = (flat_abs > v_lo) & (flat_abs < v_hi)
    elif v_lo is not None:
        mask = flat_abs > v_lo
    else:
        mask = flat_abs < v_hi
    if v_lo is not None:
        _add_tied(mask, flat_abs, v_lo, lo, hi, sorted_abs)
    if v_hi is not None and (v_lo is None or not bool(v_hi == v_lo)):
        _add_tied(mask, flat_abs, v_hi, lo, hi, sorted_abs)
    return mask


def _one_edge_with_ties(
    flat_abs: torch.Tensor, lo: int, hi: int, v_lo: torch.Tensor | None, v_hi: torch.Tensor | None
) -> torch.Tensor:
    """Top band [lo, n) or bottom band [0, hi) when entries equal to the edge value straddle it:
    all strictly inside, plus the last (top) or first (bottom) tied entries by index."""
    if v_lo is not None:  # top band: keep the `need` tied entries with the highest ranks
        mask = flat_abs > v_lo
        need = (hi - lo) - int(torch.count_nonzero(mask))
        tied = (flat_abs == v_lo).nonzero().flatten()
        mask[tied[tied.numel() - need :]] = True
    else:  # bottom band: keep the `need` tied entries with the lowest ranks
        mask = flat_abs < v_hi
        need = hi - int(torch.count_nonzero(mask))
        tied = (flat_abs == v_hi).nonzero().flatten()
        mask[tied[:need]] = True
    return mask


def _add_tied(
    mask: torch.Tensor, flat_abs: torch.Tensor, value: torch.Tensor, lo: int, hi: int, sorted_abs: torch.Tensor | None
) -> None:
    """Entries equal to `value` take consecutive ranks in index order; keep those in [lo, hi)."""
    if sorted_abs is not None:
        first = int(torch.searchsorted(sorted_abs, value, right=False))
    else:
        first = int(torch.count_nonzero(flat_abs < value))
    tied = (flat_abs == value).nonzero().flatten()
    start, stop = max(0, lo - first), max(0, hi - first)
    mask[tied[start:stop]] = True


def rescale_l1(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals the original's (mergekit's `rescale`)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _masked(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, inplace: bool, scale: float) -> torch.Tensor:
    """delta * mask * scale. The mask becomes a float factor first: multiplying by a float tensor
    is several times faster on CPU than by a boolean one, and the scale folds in for free."""
    if rescale:
        kept = rescale_l1(delta, delta * mask)
        return kept.mul_(scale) if scale != 1.0 else kept
    factors = mask.to(delta.dtype)
    if scale != 1.0:
        factors.mul_(scale)
    return delta.mul_(factors) if inplace else delta * factors


def magnitude_topk(
    delta: torch.Tensor,
    density: float,
    *,
    sorted_abs: torch.Tensor | None = None,
    rescale: bool = False,
    inplace: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """Keep the `int(density * n)` largest |delta| (at least one if density > 0), zero the rest,
    multiply by `scale`. With `inplace`, `delta` itself is overwritten (saves an allocation)."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    k = topk_count(density, n)
    mask = rank_band_mask(delta.abs().reshape(-1), n - k, n, sorted_abs).reshape(delta.shape)
    return _masked(delta, mask, rescale, inplace, scale)


def topk_count(density: float, n: int) -> int:
    """How many of `n` entries a magnitude top-k at `density` (0 < density < 1) keeps."""
    return max(1, int(density * n))


def magnitude_band(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    *,
    sorted_abs: torch.Tensor | None = None,
    rescale: bool = False,
    inplace: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """Breadcrumbs: drop the top `int(gamma * n)` outliers, then the smallest, keeping
    `int(density * n)`; the top cut shrinks when both cuts would remove more than `1 - density`."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    target = int(max(density, 0.0) * n)
    if target == 0:
        return torch.zeros_like(delta)
    n_top = int(max(gamma, 0.0) * n)
    n_bottom = max(0, n - target - n_top)
    mask = rank_band_mask(delta.abs().reshape(-1), n_bottom, n_bottom + target, sorted_abs).reshape(delta.shape)
    return _masked(delta, mask, rescale, inplace, scale)


def bernoulli_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    *,
    rescale: bool = True,
    rescale_norm: str = "inverse",
    inplace: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`; rescale kept entries by 1/density
    (unbiased, the paper) or to the original L1 norm (`rescale_norm: l1`, mergekit); times `scale`."""
    if density >= 1 or delta.numel() == 0:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = keep_indicator(uniform_like(delta, generator, scratch=True), float(density))
    return apply_keep_mask(
        delta, keep, float(density), rescale=rescale, rescale_norm=rescale_norm, inplace=inplace, scale=scale
    )


def uniform_like(tensor: torch.Tensor, generator: torch.Generator, *, scratch: bool = False) -> torch.Tensor:
    """U[0, 1) draws shaped like `tensor`, determined by the generator's seed (one draw per
    generator: each input of each tensor has its own). On CPU numpy's PCG64 is used: about three
    times faster than torch's CPU generator; on accelerators, torch's generator on that device.

    `scratch=True` fills this thread's reusable buffer instead of new memory (a fresh 100 MB
    tensor costs as much in page faults as drawing it): valid until the next scratch draw."""
    if tensor.device.type != "cpu":
        return torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)
    import numpy as np

    reuse = scratch and tensor.dtype == torch.float32
    out = _scratch(tensor) if reuse else torch.empty(tensor.shape, dtype=torch.float32)
    rng = np.random.Generator(np.random.PCG64(generator.initial_seed()))
    rng.random(tensor.numel(), dtype=np.float32, out=out.view(-1).numpy())
    return out.to(tensor.dtype)


_scratch_buffers = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """This thread's reusable buffer viewed with `like`'s shape (grown when too small)."""
    buffer = getattr(_scratch_buffers, "buffer", None)
    if buffer is None or buffer.numel() < like.numel() or buffer.dtype != like.dtype or buffer.device != like.device:
        buffer = _scratch_buffers.buffer = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buffer[: like.numel()].view(like.shape)


def keep_indicator(uniform: torch.Tensor, probs: torch.Tensor | float) -> torch.Tensor:
    """1.0 where `uniform < probs`, else 0.0, in place in `uniform` with three float passes:
    for u in [0, 1) and p in [0, 1], floor(u - p) is -1 exactly when u < p, else 0 (a difference
    of two distinct floats never rounds to 0, so the sign is exact)."""
    return uniform.sub_(probs).floor_().neg_()


def apply_keep_mask(
    delta: torch.Tensor,
    keep: torch.Tensor,
    probs: torch.Tensor | float,
    *,
    rescale: bool,
    rescale_norm: str = "inverse",
    inplace: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """Zero the dropped entries; rescale the kept ones by 1/keep-probability or by L1 matching;
    multiply by `scale`. `keep` is a boolean mask, or a 0/1 float tensor that is consumed."""
    factors = keep.to(delta.dtype) if keep.dtype == torch.bool else keep
    if rescale and rescale_norm == "l1":
        kept = rescale_l1(delta, delta * factors)
        return kept.mul_(scale) if scale != 1.0 else kept
    if rescale and isinstance(probs, float):
        factors.mul_(scale / probs)
    elif rescale:
        factors.mul_(probs.clamp_min(1e-12).reciprocal().mul_(scale))  # dropped entries stay 0
    elif scale != 1.0:
        factors.mul_(scale)
    return delta.mul_(factors) if inplace else delta * factors


def della_ramp(delta: torch.Tensor, density: float, epsilon: float) -> tuple[float, float] | None:
    """(start, slope) of the keep probability `start + slope * rank` within a row, with epsilon
    clipped to `[0, min(density, 1 - density)]`; None when it is the constant `density` (rows of
    one entry, or epsilon 0)."""
    eps = max(0.0, min(epsilon, density, 1.0 - density))
    n = _as_rows(delta).shape[1]
    if n <= 1 or eps == 0:
        return None
    return density - eps, 2 * eps / (n - 1)


def della_keep_probabilities(
    delta: torch.Tensor, density: float, epsilon: float, row_ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """MagPrune keep probabilities per row: linear in the |delta| rank from `density - eps`
    (smallest) to `density + eps` (largest); mean exactly `density`. Epsilon is clipped to
    `[0, min(density, 1 - density)]` so probabilities stay in [0, 1]."""
    ramp = della_ramp(delta, density, epsilon)
    if ramp is None:
        return torch.full_like(delta, density)
    start, slope = ramp
    ranks = row_ranks if row_ranks is not None else stable_row_ranks(delta.abs())
    ranks = _as_rows(ranks).to(delta.dtype)
    probs = start + slope * ranks
    return probs.reshape(delta.shape)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    *,
    row_ranks: torch.Tensor | None = None,
    rescale: bool = True,
    rescale_norm: str = "inverse",
    inplace: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """DELLA drop: Bernoulli with rank-dependent keep probability q; kept entries divided by q
    (unbiased, the paper) or rescaled to the original L1 norm (`rescale_norm: l1`, mergekit);
    times `scale`."""
    if density >= 1 or delta.numel() == 0:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probs = della_keep_probabilities(delta, density, epsilon, row_ranks)
    keep = keep_indicator(uniform_like(delta, generator, scratch=True), probs)
    return apply_keep_mask(delta, keep, probs, rescale=rescale, rescale_norm=rescale_norm, inplace=inplace, scale=scale)
