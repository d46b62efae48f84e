"""Task-vector candidates without caches: each tensor recomputed from the sources, chunk by chunk.

The cached path (fused.py) reads resident task vectors, their sort order and mask draws: about
3-6 fp32 copies of the sources. When a cache budget does not hold them (`cache: budgeted` or
`minimal`, candidates/budget.py), a job is streamed instead: its output is written into the live
model in row-aligned chunks of `CHUNK_ENTRIES`, each chunk's task vectors recomputed from the
resident sources (round to the recipe's `dtype`, upcast, subtract: the methods' arithmetic) and
passed to the same `_kernel` (compiled, or eager below the compile threshold). So memory beyond
sources and the candidate is a few chunks, whatever the source dtype, and the values are the
cached path's (tested bit for bit against `evomerge merge` for every fused method).

What the cached path looks up is computed per candidate:
- TIES top-k: the cut value is selected in one pass among the entries inside a bracket taken from
  a strided sample, or where the bracket misses (or many magnitudes are equal, as in bf16
  deltas) by a radix selection over the float bits of |delta| (two counting passes of 16 bits).
  Where equal magnitudes straddle the cut, the kept ones are the last by index (a stable sort's
  rule): a pass from the end finds the first kept one, and the kernel compares flat indices
  (`magnitude_index`), so no list of tied entries is ever built;
- DARE/DELLA draws: the generator's own PCG64 stream, advanced to the chunk's first entry, so a
  chunk gets exactly its slice of `uniform_like` (on accelerators, torch's generator: drawn per
  tensor, since its stream cannot be advanced);
- DELLA row ranks: computed per chunk (chunks are whole rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from evomerge.candidates.fused import (
    _METHODS,
    FusedTaskVectors,
    TopkCut,
    _kernel,
    job_flags,
    job_scalars,
    packed_scalars,
)
from evomerge.merge.jobs import MergePlan, TensorJob
from evomerge.merge.methods.sparsify import stable_row_ranks, topk_count, uniform_like

CHUNK_ENTRIES = 1 << 20  # CPU: 4 MB of fp32 per temporary, the chunk's working set stays in cache
DEVICE_CHUNK_ENTRIES = 1 << 24  # accelerators: 64 MB per temporary, few kernel launches per tensor

DeltaChunk = Callable[[int, int], torch.Tensor]  # (start, stop) of the flat tensor -> fp32 task vector


class StreamedTaskVectors:
    """Writes task-vector jobs into resident parameters chunk by chunk, with no cached data."""

    def __init__(self, fused: FusedTaskVectors, chunk_entries: int | None = None):
        self.fused = fused
        self.chunk_entries = chunk_entries  # None: CHUNK_ENTRIES on CPU, DEVICE_CHUNK_ENTRIES elsewhere
        self.jobs = 0  # jobs streamed here (tests check the path ran)
        self.bracket = True  # TIES cuts: sampled bracket first (tests switch it off for the radix path)

    def write(self, plan: MergePlan, job: TensorJob, source, target: torch.Tensor, *, compiled: bool) -> bool:
        """Compute `job` into `target`; False when the eager method must run (see `job_scalars`)."""
        if job.base is None or plan.method.name not in _METHODS or not target.is_contiguous():
            return False
        sparsifier, has_consensus = _METHODS[plan.method.name]
        base = source.get(job.base).reshape(-1)
        inputs = [source.get(ref).reshape(-1) for ref in job.inputs]
        n = base.numel()
        if n == 0:
            return False
        dtype = plan.input_dtype

        def delta(i: int) -> DeltaChunk:
            return lambda a, b: _fp32(inputs[i][a:b], dtype) - _fp32(base[a:b], dtype)

        shape = tuple(job.shape)
        row = n // shape[0] if len(shape) >= 2 and shape[0] else n  # `sparsify._as_rows`
        chunk = self.chunk_entries or (CHUNK_ENTRIES if target.device.type == "cpu" else DEVICE_CHUNK_ENTRIES)
        # DELLA ranks within rows: its chunks are whole rows (one row when a row is longer)
        step = max(1, chunk // row) * row if sparsifier == "della" else chunk
        like = torch.empty(shape, device="meta")

        def cut(i: int, density: float) -> TopkCut:
            at = (lambda idx: _fp32(inputs[i][idx], dtype) - _fp32(base[idx], dtype)) if self.bracket else None
            return streamed_topk_cut(delta(i), n, density, step, at)

        scalars = job_scalars(job, like, sparsifier, cut, True)
        if scalars is None:
            return False
        if sparsifier == "magnitude":  # the tied entries are not listed: an index compare keeps them
            sparsifier, scalars = "magnitude_index", scalars.by_index()
        consensus, normalize, rescale = job_flags(job, has_consensus)
        values = packed_scalars(job, scalars, consensus, normalize)
        device = target.device
        packed = torch.tensor(values, dtype=torch.float32, device=device)
        flags = (consensus, normalize, rescale, values[-2] != 1.0, normalize and consensus is None, dtype)
        kernel = self.fused.kernel() if compiled and not self.fused.disabled else _kernel
        generators = plan.generators(job, device) if sparsifier in ("bernoulli", "della") else []
        whole_draws = None
        if generators and device.type != "cpu":  # torch's device generators cannot skip ahead
            whole_draws = [uniform_like(torch.empty(n, device=device), g) for g in generators]
        out = target.view(-1)
        for a in range(0, n, step):
            b = min(n, a + step)
            deltas = [delta(i)(a, b) for i in range(len(inputs))]
            draws: list[torch.Tensor] = []
            if whole_draws is not None:
                draws = [d[a:b] for d in whole_draws]
            elif generators:
                draws = [uniform_range(g, a, b) for g in generators]
            ranks: list[torch.Tensor] = []
            if sparsifier == "della":
                ranks = [stable_row_ranks(d.view(-1, row).abs()).view(-1) for d in deltas]
            elif sparsifier == "magnitude_index":
                ranks = [torch.tensor(start - a, device=device) for start in scalars.starts]
            try:
                kernel(out[a:b], base[a:b], deltas, draws, ranks, packed, sparsifier, *flags)
            except Exception:
                if kernel is _kernel or a > 0 or self.fused.fused_jobs:
                    raise
                self.fused.disable_after_failure()  # logs once; later chunks and jobs run eager
                kernel = _kernel
                kernel(out[a:b], base[a:b], deltas, draws, ranks, packed, sparsifier, *flags)
        self.jobs += 1
        return True


def _fp32(tensor: torch.Tensor, input_dtype: torch.dtype | None) -> torch.Tensor:
    if input_dtype is not None:
        tensor = tensor.to(input_dtype)
    return tensor.to(torch.float32)


def uniform_range(generator: torch.Generator, start: int, stop: int) -> torch.Tensor:
    """Entries `start:stop` of `uniform_like(<flat tensor>, generator)` on CPU, without drawing the
    rest: numpy's PCG64 gives two fp32 draws per 64-bit step, so the stream is advanced by start/2
    steps (and one draw dropped when start is odd)."""
    import numpy as np

    bit_generator = np.random.PCG64(generator.initial_seed())
    bit_generator.advance(start // 2)
    skip = start % 2
    out = torch.empty(stop - start + skip, dtype=torch.float32)
    np.random.Generator(bit_generator).random(out.numel(), dtype=np.float32, out=out.numpy())
    return out[skip:]


def _chunks(delta: DeltaChunk, n: int, step: int, *, reverse: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    starts = range(0, n, step)
    for a in reversed(starts) if reverse else starts:
        yield a, delta(a, min(n, a + step)).abs()


def streamed_topk_cut(
    delta: DeltaChunk,
    n: int,
    density: float,
    step: int,
    delta_at: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TopkCut:
    """`fused._topk_cut` without a sorted copy of |delta|, in its index form: the cut value v and
    the first flat index from which entries equal to v are kept (the last ones by index, a stable
    sort's rule). Memory: a few chunks, whatever the number of ties.

    With `delta_at` (the task vector at given flat indices), v is selected in one pass among the
    entries inside a bracket from a strided sample (`_bracketed_value`); when the bracket misses
    or holds too much (many equal magnitudes), or without `delta_at`, by a radix selection over the
    float bits (`_radix_value`, two passes). Where ties straddle the cut, one more pass from the end
    finds the first kept tied entry (`_first_kept_tied`)."""
    k = topk_count(density, n)
    if k >= n:
        return TopkCut(float("-inf"), None, float("-inf"), 0)
    rank = n - k
    found = _bracketed_value(delta, delta_at, n, rank, step) if delta_at is not None else None
    value, less, equal = found if found is not None else _radix_value(delta, n, rank, step)
    if value == 0.0 or less == rank:
        return TopkCut(value, None, value, 0)  # no tie at the cut, or tied zeros (a kept zero changes nothing)
    need = less + equal - rank  # kept tied entries: the last `need` equal to the value, by index
    return TopkCut(value, None, value, _first_kept_tied(delta, n, step, value, need))


SAMPLE = 1 << 16


def _bracketed_value(
    delta: DeltaChunk, delta_at: Callable[[torch.Tensor], torch.Tensor], n: int, rank: int, step: int
) -> tuple[float, int, int] | None:
    """(v, entries below v, entries equal to v) as `sparsify._kth_by_sampling` finds v: a bracket
    [low, high] around the rank from a strided sample (about 12 standard deviations of the sample
    quantile wide, ~5% of the entries), one pass counting what lies below it and keeping the
    values inside, then a selection among those. None when the bracket misses the rank or holds
    more than 1/12 of the entries (heavy ties: the radix selection's memory does not grow)."""
    probe = delta(0, 1)
    positions = torch.arange(0, n, max(1, n // SAMPLE), device=probe.device)
    sample = delta_at(positions).abs().sort().values
    m = sample.numel()
    centre = rank / max(1, n - 1) * (m - 1)
    spread = 6.0 * m**0.5 + 2
    low = sample[max(0, int(centre - spread))]
    high = sample[min(m - 1, int(centre + spread) + 1)]
    limit = n // 12 + SAMPLE
    below = torch.zeros((), dtype=torch.int64, device=probe.device)
    values: list[torch.Tensor] = []
    held = 0
    for _, magnitude in _chunks(delta, n, step):
        below += (magnitude < low).sum()
        values.append(magnitude[(magnitude >= low) & (magnitude <= high)])
        held += values[-1].numel()
        if held > limit:
            return None
    inside = torch.cat(values)
    offset = rank - int(below)
    if not 0 <= offset < inside.numel():
        return None
    value = torch.kthvalue(inside, offset + 1).values
    less = int(below) + int((inside < value).sum())
    return float(value), less, int((inside == value).sum())


def _radix_value(delta: DeltaChunk, n: int, rank: int, step: int) -> tuple[float, int, int]:
    """(v, entries below v, entries equal to v) for the value v of ascending rank `rank` of
    |delta|, by radix selection on the float bits (non-negative floats order as their int32 bits):
    a pass counting the high 16 bits, a pass counting the low 16 bits inside the right bucket."""
    high: torch.Tensor | None = None  # counts per high 16 bits (the sign bit is 0), on the chunks' device
    for _, magnitude in _chunks(delta, n, step):
        counts = torch.bincount((magnitude.view(torch.int32) >> 16).reshape(-1), minlength=1 << 15)
        high = counts if high is None else high.add_(counts)
    assert high is not None
    below_high = high.cumsum(0).cpu()
    top = int(torch.searchsorted(below_high, torch.tensor(rank), right=True))  # first bucket past `rank`
    below = int(below_high[top - 1]) if top else 0
    low: torch.Tensor | None = None
    for _, magnitude in _chunks(delta, n, step):
        bits = magnitude.view(torch.int32).reshape(-1)
        counts = torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
        low = counts if low is None else low.add_(counts)
    assert low is not None
    below_low = low.cumsum(0).cpu()
    bottom = int(torch.searchsorted(below_low, torch.tensor(rank - below), right=True))
    less = below + (int(below_low[bottom - 1]) if bottom else 0)
    equal = int(below_low[bottom]) - (int(below_low[bottom - 1]) if bottom else 0)
    value = torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32)
    return float(value), less, equal


def _first_kept_tied(delta: DeltaChunk, n: int, step: int, value: float, need: int) -> int:
    """The flat index of the `need`-th entry equal to `value` counted from the end: a pass from
    the last chunk that counts, then lists only the chunk where the count is reached."""
    seen = 0
    for a, magnitude in _chunks(delta, n, step, reverse=True):
        equal = magnitude.reshape(-1) == value
        count = int(equal.sum())
        if seen + count >= need:
            where = equal.nonzero().flatten()
            return a + int(where[where.numel() - (need - seen)])
        seen += count
    raise AssertionError("fewer tied entries than counted")
