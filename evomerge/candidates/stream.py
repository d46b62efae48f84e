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
- TIES top-k: the cut value comes from a radix selection over the float bits of |delta| (two
  counting passes of 16 bits each). Where equal magnitudes straddle the cut (bf16 task vectors
  tie by the million), the kept ones are the last by index (a stable sort's rule): a pass from
  the end finds the first kept one, and the kernel compares flat indices (`magnitude_index`), so
  no list of tied entries is ever built;
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
    index_scalar,
    job_flags,
    job_scalars,
    packed_scalars,
)
from evomerge.merge.jobs import MergePlan, TensorJob
from evomerge.merge.methods.sparsify import stable_row_ranks, topk_count, uniform_like

CHUNK_ENTRIES = 1 << 18  # CPU: 1 MB of fp32 per temporary (as fast as 1 << 20 at 100M, a quarter of the memory)
DEVICE_CHUNK_ENTRIES = 1 << 24  # accelerators: 64 MB per temporary, few kernel launches per tensor

DeltaChunk = Callable[[int, int], torch.Tensor]  # (start, stop) of the flat tensor -> fp32 task vector
MagnitudeChunk = DeltaChunk  # (start, stop) -> |task vector| in fp32


class StreamedTaskVectors:
    """Writes task-vector jobs into resident parameters chunk by chunk, with no cached data."""

    def __init__(self, fused: FusedTaskVectors, chunk_entries: int | None = None):
        self.fused = fused
        self.chunk_entries = chunk_entries  # None: CHUNK_ENTRIES on CPU, DEVICE_CHUNK_ENTRIES elsewhere
        self.jobs = 0  # jobs streamed here (tests check the path ran)
        self._magnitude: Callable[..., torch.Tensor] | None = None

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

        magnitude_of = self._compiled_magnitude() if compiled and not self.fused.disabled else _magnitude

        def cut(i: int, density: float) -> TopkCut:
            nonlocal magnitude_of
            try:
                return streamed_topk_cut(lambda a, b: magnitude_of(inputs[i][a:b], base[a:b], dtype), n, density, step)
            except Exception:  # compilation fails before anything is computed
                if magnitude_of is _magnitude or self.jobs or self.fused.fused_jobs:
                    raise
                self.fused.disable_after_failure()  # logs once; eager from now on
                magnitude_of = _magnitude
                return streamed_topk_cut(lambda a, b: _magnitude(inputs[i][a:b], base[a:b], dtype), n, density, step)

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
        kernel = self.fused.kernel() if compiled and not self.fused.disabled else _kernel  # after `cut`: may be off
        generators = plan.generators(job, device) if sparsifier in ("bernoulli", "della") else []
        whole_draws = None
        if generators and device.type != "cpu":  # torch's device generators cannot skip ahead
            whole_draws = [uniform_like(torch.empty(shape, device=device), g).reshape(-1) for g in generators]
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
                ranks = [index_scalar(start - a, b - a, device) for start in scalars.starts]
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

    def _compiled_magnitude(self) -> Callable[..., torch.Tensor]:
        """`_magnitude` compiled: one loop instead of four passes over each chunk (the cut's
        counting passes read every task vector twice per candidate). Same values: conversions,
        one fp32 subtraction, abs."""
        if self._magnitude is None:
            self._magnitude = torch.compile(
                _magnitude, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
            )
        return self._magnitude


def _magnitude(tensor: torch.Tensor, base: torch.Tensor, input_dtype: torch.dtype | None) -> torch.Tensor:
    """|task vector| of a chunk, in fp32: the methods' arithmetic (round to the recipe's dtype,
    upcast, subtract)."""
    return (_fp32(tensor, input_dtype) - _fp32(base, input_dtype)).abs()


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


def _chunks(magnitude: MagnitudeChunk, n: int, step: int) -> Iterator[torch.Tensor]:
    for a in range(0, n, step):
        yield magnitude(a, min(n, a + step))


def streamed_topk_cut(magnitude: MagnitudeChunk, n: int, density: float, step: int) -> TopkCut:
    """`fused._topk_cut` without a sorted copy of |delta|, in its index form: the cut value v and
    the first flat index from which entries equal to v are kept (the last ones by index, a stable
    sort's rule). v comes from a radix selection over the float bits (`_radix_value`, two counting
    passes); where ties straddle the cut, one more pass from the end finds the first kept tied
    entry (`_first_kept_tied`). Memory: a few chunks, whatever the number of ties.

    Tried and dropped: a bracket from a strided sample (as `sparsify._kth_by_sampling`), one pass
    keeping the values inside it: eager, its compares and compaction cost 2-3x the two counting
    passes on fp32 task vectors, and bf16 ones tie so much that the bracket holds too many."""
    k = topk_count(density, n)
    if k >= n:
        return TopkCut(float("-inf"), None, float("-inf"), 0)
    rank = n - k
    value, less, equal = _radix_value(magnitude, n, rank, step)
    if value == 0.0 or less == rank:
        return TopkCut(value, None, value, 0)  # no tie at the cut, or tied zeros (a kept zero changes nothing)
    need = less + equal - rank  # kept tied entries: the last `need` equal to the value, by index
    return TopkCut(value, None, value, _first_kept_tied(magnitude, n, step, value, need))


def _radix_value(magnitude: MagnitudeChunk, n: int, rank: int, step: int) -> tuple[float, int, int]:
    """(v, entries below v, entries equal to v) for the value v of ascending rank `rank` of
    |delta|, by radix selection on the float bits (non-negative floats order as their int32 bits):
    a pass counting the high 16 bits, a pass counting the low 16 bits inside the right bucket."""
    high: torch.Tensor | None = None  # counts per high 16 bits (the sign bit is 0), on the chunks' device
    for chunk in _chunks(magnitude, n, step):
        counts = torch.bincount((chunk.view(torch.int32) >> 16).reshape(-1), minlength=1 << 15)
        high = counts if high is None else high.add_(counts)
    assert high is not None
    below_high = high.cumsum(0).cpu()
    top = int(torch.searchsorted(below_high, torch.tensor(rank), right=True))  # first bucket past `rank`
    below = int(below_high[top - 1]) if top else 0
    low: torch.Tensor | None = None
    for chunk in _chunks(magnitude, n, step):
        bits = chunk.view(torch.int32).reshape(-1)
        counts = torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
        low = counts if low is None else low.add_(counts)
    assert low is not None
    below_low = low.cumsum(0).cpu()
    bottom = int(torch.searchsorted(below_low, torch.tensor(rank - below), right=True))
    less = below + (int(below_low[bottom - 1]) if bottom else 0)
    equal = int(below_low[bottom]) - (int(below_low[bottom - 1]) if bottom else 0)
    value = torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32)
    return float(value), less, equal


def _first_kept_tied(magnitude: MagnitudeChunk, n: int, step: int, value: float, need: int) -> int:
    """The flat index of the `need`-th entry equal to `value` counted from the end: a pass from
    the last chunk that counts until it is reached."""
    seen = 0
    for a in reversed(range(0, n, step)):
        equal = magnitude(a, min(n, a + step)).reshape(-1) == value
        count = int(equal.sum())
        if seen + count >= need:
            where = equal.nonzero().flatten()
            return a + int(where[where.numel() - (need - seen)])
        seen += count
    raise AssertionError("fewer tied entries than counted")
