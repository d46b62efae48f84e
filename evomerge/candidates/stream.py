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
- TIES top-k: the cut value is found by a radix selection over the float bits of |delta| (two
  counting passes of 16 bits each), then, where equal magnitudes straddle the cut, a third pass
  collects the kept tied entries (the last ones by index: a stable sort's rule);
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
    _kernel,
    job_flags,
    job_scalars,
    packed_scalars,
    patch_tied,
)
from evomerge.merge.jobs import MergePlan, TensorJob
from evomerge.merge.methods.sparsify import stable_row_ranks, topk_count, uniform_like

CHUNK_ENTRIES = 1 << 20  # 4 MB of fp32 per temporary: the chunk's working set stays in cache

DeltaChunk = Callable[[int, int], torch.Tensor]  # (start, stop) of the flat tensor -> fp32 task vector


class StreamedTaskVectors:
    """Writes task-vector jobs into resident parameters chunk by chunk, with no cached data."""

    def __init__(self, fused: FusedTaskVectors, chunk_entries: int = CHUNK_ENTRIES):
        self.fused = fused
        self.chunk_entries = chunk_entries
        self.jobs = 0  # jobs streamed here (tests check the path ran)

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
        # DELLA ranks within rows: its chunks are whole rows (one row when a row is longer)
        step = max(1, self.chunk_entries // row) * row if sparsifier == "della" else self.chunk_entries
        like = torch.empty(shape, device="meta")

        def cut(i: int, density: float) -> tuple[float, torch.Tensor | None]:
            return streamed_topk_cut(delta(i), n, density, step)

        scalars = job_scalars(job, like, sparsifier, cut, True)
        if scalars is None:
            return False
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
            ranks = [stable_row_ranks(d.view(-1, row).abs()).view(-1) for d in deltas] if sparsifier == "della" else []
            try:
                kernel(out[a:b], base[a:b], deltas, draws, ranks, packed, sparsifier, *flags)
            except Exception:
                if kernel is _kernel or a > 0 or self.fused.fused_jobs:
                    raise
                self.fused.disable_after_failure()  # logs once; later chunks and jobs run eager
                kernel = _kernel
                kernel(out[a:b], base[a:b], deltas, draws, ranks, packed, sparsifier, *flags)
        if any(t is not None for t in scalars.tied):
            patch_tied(
                target,
                base,
                lambda i, at: _fp32(inputs[i][at], dtype) - _fp32(base[at], dtype),
                scalars,
                packed,
                flags,
            )
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


def streamed_topk_cut(delta: DeltaChunk, n: int, density: float, step: int) -> tuple[float, torch.Tensor | None]:
    """`fused._topk_cut` without a sorted copy: the value v of stable ascending rank n - k of |delta|
    by radix selection on its float bits (non-negative floats order as their int32 bits), then,
    when equal magnitudes straddle the cut, the kept tied entries: the last ones by index."""
    k = topk_count(density, n)
    if k >= n:
        return float("-inf"), None
    rank = n - k
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for _, magnitude in _chunks(delta, n, step):
        high += torch.bincount((magnitude.view(torch.int32) >> 16).cpu(), minlength=1 << 15)
    below_high = high.cumsum(0)
    top = int(torch.searchsorted(below_high, rank, right=True))  # first bucket with more than `rank` below it
    below = int(below_high[top - 1]) if top else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for _, magnitude in _chunks(delta, n, step):
        bits = magnitude.view(torch.int32)
        low += torch.bincount((bits[(bits >> 16) == top] & 0xFFFF).cpu(), minlength=1 << 16)
    below_low = low.cumsum(0)
    bottom = int(torch.searchsorted(below_low, rank - below, right=True))
    less = below + (int(below_low[bottom - 1]) if bottom else 0)
    equal = int(low[bottom])
    value = torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32)
    if float(value) == 0.0 or less == rank:
        return float(value), None  # no tie at the cut, or tied zeros (a kept zero changes nothing)
    need = less + equal - rank  # kept tied entries: the last `need` equal to the value, by index
    found: list[torch.Tensor] = []
    count = 0
    for a, magnitude in _chunks(delta, n, step, reverse=True):
        where = (magnitude == value.to(magnitude.device)).nonzero().flatten().cpu() + a
        found.insert(0, where)
        count += where.numel()
        if count >= need:
            break
    tied = torch.cat(found)[-need:]
    above = torch.nextafter(value, torch.tensor([float("inf")]))
    return float(above), tied
