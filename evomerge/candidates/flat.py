"""A tiny model's task-vector candidate as one pass over a flat vector: the in-memory sink's path
for plans of at most `MAX_PARAMETERS` (the toy zoo), where per-tensor overhead dominates.

A small model is many small tensors, and an eager merge spends more per tensor on dispatch than on
arithmetic (about 80 µs per tensor on the toy zoo: some 25 operations, each allocating). Here what
every candidate reuses is concatenated once per plan layout: the base (rounded to the recipe's
`dtype`, in fp32), the task vectors, and each entry's stable magnitude rank (TIES) or row rank
(DELLA). A candidate is then its per-tensor scalars spread over their entries (one `index_select`
per scalar row the method reads) and one uncompiled call of fused.py's `_kernel` on the whole
vector: the eager methods' operations in the same order, so the same values (tested against
`evomerge merge`). The TIES top-k is `rank >= n - k` per entry, exact with equal magnitudes too.

Memory per layout: at most (6 + 8 x inputs) fp32 values per parameter (base, output, task vectors,
ranks, the scalar rows, draws of two mask seeds; `layout_bytes`); at most `MAX_LAYOUTS` are kept,
within the worker's cache budget (candidates/budget.py; `cache: minimal` never builds one).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from evomerge.candidates.budget import ByteCache
from evomerge.candidates.fused import _METHODS, _kernel, _scalars, job_flags, packed_scalars
from evomerge.candidates.rescale import kept_abs, l1_ratio
from evomerge.merge.jobs import MergePlan, TensorJob
from evomerge.merge.methods.base import DeltaCache
from evomerge.merge.methods.sparsify import stable_row_ranks, uniform_like

MAX_LAYOUTS = 2
# Above this the whole-model passes stop fitting in cache and the per-tensor eager path, which
# works tensor by tensor, is faster: measured crossover between 0.25M (flat 20-30% faster for
# ties and dare_ties) and 0.6M parameters (even or slower) on the 2-core development machine.
MAX_PARAMETERS = 400_000
EXACT_FP32_INTEGERS = 1 << 24  # ranks are compared in fp32; larger tensors take the per-tensor path

Caches = Callable[[TensorJob], "Sequence[DeltaCache] | None"]


@dataclass
class _Layout:
    """The concatenated inputs of one plan layout (job order) and the buffers a candidate fills."""

    spans: list[tuple[int, int]]  # (offset, size) of each job
    segment: torch.Tensor  # job index of every entry (int64, for index_select)
    base: torch.Tensor  # fp32, already rounded to the recipe's dtype
    deltas: list[torch.Tensor]
    ranks: list[torch.Tensor]  # fp32 stable ranks (rank) or row ranks (della); else empty
    out: torch.Tensor  # the merged values, in the output dtype
    table: torch.Tensor  # per-entry scalar rows (see `_kernel`); only the rows a method reads are filled
    draws: OrderedDict[int, list[torch.Tensor]] = field(default_factory=OrderedDict)  # mask seed -> draws


def layout_bytes(parameters: int, inputs: int) -> int:
    """Upper bound of one layout's bytes: base, output, task vectors, ranks, the scalar table
    (5 rows per input + 2), the segment index (int64) and the draws of two mask seeds."""
    return 4 * parameters * (1 + 1 + inputs + inputs + 5 * inputs + 2 + 2 + 2 * inputs)


class FlatTaskVectors:
    """Computes every job of a task-vector plan at once into a flat buffer (`compute`)."""

    KIND = "flat"

    def __init__(self, cache: ByteCache | None = None) -> None:
        self.cache = cache if cache is not None else ByteCache()
        self._layouts: OrderedDict[tuple, None] = OrderedDict()  # keys of the layouts kept in `cache`
        self.candidates = 0  # candidates computed here (tests check that the path ran)

    def compute(self, plan: MergePlan, caches: Caches, source) -> dict[str, torch.Tensor] | None:
        """Each job's output (views of one buffer, valid until the next call), or None when some job
        needs the per-tensor path (no base, a different input count or flags, L1 rescaling, ...)."""
        if plan.method.name not in _METHODS or plan.prepared is not None or not plan.jobs:
            return None
        sparsifier, has_consensus = _METHODS[plan.method.name]
        sparsifier = "rank" if sparsifier == "magnitude" else sparsifier
        jobs = plan.jobs
        inputs = len(jobs[0].inputs)
        flags = {job_flags(job, has_consensus) for job in jobs}
        if len(flags) != 1 or inputs == 0 or any(j.base is None or len(j.inputs) != inputs for j in jobs):
            return None
        consensus, normalize, rescale = flags.pop()
        job_caches = [caches(job) for job in jobs]
        all_scalars = [_scalars(job, job_cache, sparsifier) for job, job_cache in zip(jobs, job_caches, strict=True)]
        if any(scalars is None for scalars in all_scalars) or len({s.l1 for s in all_scalars}) != 1:  # type: ignore[union-attr]
            return None
        l1 = all_scalars[0].l1  # type: ignore[union-attr]
        layout = self._layout(plan, job_caches, source, sparsifier)  # type: ignore[arg-type]
        if layout is None:
            return None
        draws = self._draws(plan, layout, job_caches) if sparsifier in ("bernoulli", "della") else []  # type: ignore[arg-type]
        if l1:
            ratios = self._l1_ratios(plan, layout, all_scalars, draws)  # type: ignore[arg-type]
            if ratios is None:
                return None
            for scalars, job_ratios in zip(all_scalars, ratios, strict=True):
                scalars.ratios = job_ratios  # type: ignore[union-attr]
            rescale = False  # the ratios replace the 1/q rescaling
        rows: list[list[float]] = [[] for _ in range((5 if l1 else 4) * inputs + 2)]
        for job, scalars in zip(jobs, all_scalars, strict=True):
            for row, value in zip(rows, packed_scalars(job, scalars, consensus, normalize), strict=True):  # type: ignore[arg-type]
                row.append(value)
        scaled = any(value != 1.0 for value in rows[4 * inputs])
        divided = any(value != 1.0 for value in rows[4 * inputs + 1])
        used = list(range(2 * inputs, 3 * inputs))  # factors
        used += list(range(inputs)) if sparsifier != "none" else []
        used += list(range(inputs, 2 * inputs)) if sparsifier == "della" else []
        used += list(range(3 * inputs, 4 * inputs)) if normalize and consensus is not None else []
        used += [4 * inputs] if scaled else []
        used += [4 * inputs + 1] if divided else []
        used += list(range(4 * inputs + 2, 5 * inputs + 2)) if l1 else []
        per_job = torch.tensor(rows, dtype=torch.float32, device=layout.segment.device)
        for row in used:
            torch.index_select(per_job[row], 0, layout.segment, out=layout.table[row])
        _kernel(
            layout.out,
            layout.base,
            layout.deltas,
            draws,
            layout.ranks,
            layout.table,
            sparsifier,
            consensus,
            normalize,
            rescale,
            scaled,
            divided,
            None,
            l1,
        )
        self.candidates += 1
        return {
            job.name: layout.out[offset : offset + size].view(job.shape)
            for job, (offset, size) in zip(jobs, layout.spans, strict=True)
        }

    def _layout(
        self, plan: MergePlan, job_caches: Sequence[Sequence[DeltaCache]], source, sparsifier: str
    ) -> _Layout | None:
        jobs = plan.jobs
        key = (
            tuple((j.name, j.base, j.inputs) for j in jobs),
            tuple(m.path for m in plan.models),
            plan.input_dtype,
            sparsifier,
            jobs[0].out_dtype,
        )
        layout = self.cache.get((self.KIND, key))
        if layout is not None:
            self._layouts.move_to_end(key)
            return layout
        sizes = [math.prod(job.shape) for job in jobs]
        if len({job.out_dtype for job in jobs}) != 1 or max(sizes) >= EXACT_FP32_INTEGERS:
            return None
        inputs = len(jobs[0].inputs)
        if not self.cache.reserve([((self.KIND, key), layout_bytes(sum(sizes), inputs))]):
            return None  # over the cache budget: the per-tensor path
        spans, offset = [], 0
        for size in sizes:
            spans.append((offset, size))
            offset += size
        device = job_caches[0][0].delta.device

        def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])

        bases = [source.get(job.base) for job in jobs]
        if plan.input_dtype is not None:
            bases = [b.to(plan.input_dtype) for b in bases]
        ranks: list[torch.Tensor] = []
        if sparsifier == "rank":
            ranks = [flat([stable_row_ranks(c[i].delta.abs().reshape(-1)) for c in job_caches]) for i in range(inputs)]
        elif sparsifier == "della":
            ranks = [flat([c[i].row_ranks for c in job_caches]) for i in range(inputs)]  # type: ignore[misc]
        layout = _Layout(
            spans=spans,
            segment=torch.repeat_interleave(torch.arange(len(jobs), device=device), torch.tensor(sizes, device=device)),
            base=flat(bases),
            deltas=[flat([c[i].delta for c in job_caches]) for i in range(inputs)],
            ranks=ranks,
            out=torch.empty(offset, dtype=jobs[0].out_dtype, device=device),
            table=torch.empty(5 * inputs + 2, offset, device=device),
        )
        while len(self._layouts) >= MAX_LAYOUTS:
            self.cache.drop((self.KIND, self._layouts.popitem(last=False)[0]))
        self.cache.put((self.KIND, key), layout, layout_bytes(offset, inputs))
        self._layouts[key] = None
        return layout

    @staticmethod
    def _l1_ratios(
        plan: MergePlan, layout: _Layout, all_scalars: Sequence, draws: Sequence[torch.Tensor]
    ) -> list[list[float]] | None:
        """Per job and input `rescale_l1`'s factor (see fused.l1_ratio): the kept magnitudes of
        the whole flat vector in one eager pass per input, then each job's sum over its own
        entries, viewed with the job's shape as the eager method sums them."""
        ratios: list[list[float]] = [[] for _ in all_scalars]
        for i in range(len(layout.deltas)):
            row = torch.tensor([s.cuts[i] for s in all_scalars], dtype=torch.float32, device=layout.base.device)
            cut = torch.index_select(row, 0, layout.segment)
            slope = None
            if layout.ranks:
                slopes = torch.tensor([s.slopes[i] for s in all_scalars], dtype=torch.float32, device=row.device)
                slope = torch.index_select(slopes, 0, layout.segment)
            kept = torch.empty_like(layout.deltas[i])
            kept_abs(kept, layout.deltas[i], draws[i], layout.ranks[i] if layout.ranks else None, cut, slope)
            for j, (job, (offset, size)) in enumerate(zip(plan.jobs, layout.spans, strict=True)):
                if all_scalars[j].cuts[i] >= 1.0:  # density 1: the eager method does not rescale
                    ratios[j].append(1.0)
                    continue
                delta = layout.deltas[i][offset : offset + size].view(job.shape)
                ratio = l1_ratio(delta.abs().sum(), kept[offset : offset + size].view(job.shape))
                if ratio is None:
                    return None
                ratios[j].append(ratio)
        return ratios

    @staticmethod
    def _draws(plan: MergePlan, layout: _Layout, job_caches: Sequence[Sequence[DeltaCache]]) -> list[torch.Tensor]:
        """The uniform draws of every job's generators (`uniform_like`, as the eager methods draw),
        concatenated; kept for the last two mask seeds (a search uses one per run by default)."""
        draws = layout.draws.get(plan.seed)
        if draws is None:
            device = layout.base.device
            per_job = [
                [uniform_like(c.delta, g) for g, c in zip(plan.generators(job, device), caches, strict=True)]
                for job, caches in zip(plan.jobs, job_caches, strict=True)
            ]
            draws = [torch.cat([d[i].reshape(-1) for d in per_job]) for i in range(len(job_caches[0]))]
            while len(layout.draws) >= 2:
                layout.draws.popitem(last=False)
            layout.draws[plan.seed] = draws
        return draws
