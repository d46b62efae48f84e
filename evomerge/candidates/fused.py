"""One-pass kernels for task-vector candidates: the in-memory sink's fast path.

Eager, a TIES candidate makes about 25 passes over memory per tensor (masks, products, the sign
election, sums, the divisor), each allocating a fresh tensor. Here the same arithmetic, operation
for operation, is one function compiled by `torch.compile` (TorchInductor: a C++/OpenMP loop on
CPU, Triton on GPU) that reads the base, the resident task vectors and the per-candidate scalars
and writes the resident model's parameter directly: one read of each input, one write.

What a candidate changes is only scalars (weights, thresholds, keep probabilities), so:
- a TIES top-k at density d is `|delta| >= v` with `v` looked up in the cached sorted magnitudes;
  where equal magnitudes straddle the cut, the kernel keeps only `|delta| > v` and the kept tied
  entries (known from the cached stable sort order) are recomputed and written afterwards;
- DARE/DELLA compare cached uniform draws with the keep probability. The draws are the same ones
  the eager methods take from each tensor's generator (`sparsify.uniform_like`), kept in a
  bounded `DrawStore`: a search uses one mask seed per run, so they are drawn once.

Results equal the eager methods' (tested with `torch.equal` against `evomerge merge`: identical
values; only the sign of an exact zero is not compared); anything the kernel does not cover (L1
rescaling, Breadcrumbs, density 0, data-aware context) runs the eager method. Compilation costs
about 20 s the first time on a machine and about 5 s per process after that (Inductor's cache),
so `auto` uses the kernels only for models large enough to repay it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch

from evomerge.candidates.budget import ByteCache
from evomerge.candidates.rescale import L1Ratios
from evomerge.merge.jobs import MergePlan, TensorJob
from evomerge.merge.methods.base import DeltaCache
from evomerge.merge.methods.sparsify import della_ramp, topk_count, uniform_like

log = logging.getLogger(__name__)

KernelMode = Literal["auto", "compiled", "eager"]
KERNELS_ENV = "EVOMERGE_KERNELS"
AUTO_MIN_PARAMETERS = 20_000_000  # below this a whole eager candidate costs less than compiling
DEFAULT_DRAW_CACHE_BYTES = 4 << 30

# method -> (sparsifier, whether TIES sign election applies)
_METHODS: dict[str, tuple[str, bool]] = {
    "task_arithmetic": ("none", False),
    "ties": ("magnitude", True),
    "dare_ties": ("bernoulli", True),
    "dare_linear": ("bernoulli", False),
    "della": ("della", True),
    "della_linear": ("della", False),
}


def kernel_mode(requested: str | None = None) -> KernelMode:
    """The requested mode, else `$EVOMERGE_KERNELS`, else `auto`; anything else is an error."""
    mode = requested or os.environ.get(KERNELS_ENV) or "auto"
    if mode not in ("auto", "compiled", "eager"):
        raise ValueError(f"kernels: {mode!r} is not one of auto, compiled, eager (check {KERNELS_ENV})")
    return mode  # type: ignore[return-value]


def _kernel(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    draws: list[torch.Tensor],
    ranks: list[torch.Tensor],
    scalars: torch.Tensor,
    sparsifier: str,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    scaled: bool,
    divided: bool,
    input_dtype: torch.dtype | None,
    l1: bool = False,
    finite: bool = False,
) -> torch.Tensor | None:
    """`methods.task_arithmetic.generalized_task_arithmetic` with the same operations in the same
    order, except that an entry below a magnitude cut is a `where` to 0 instead of a product with
    a 0/1 factor (same values; the sign of a zero may differ; about 7% faster). `scalars` (fp32, packed by
    `FusedTaskVectors.write`) holds per input a cut, a slope, a factor and a weight, then lambda
    (used when `scaled`) and the divisor (when `divided`); each may also be one value per entry
    (flat.py). Kept entries: magnitude |d| >= cut (or none: `deltas` are already masked);
    magnitude_index |d| > cut, or |d| == cut at a flat index >= `ranks[i]` (0-d, int32 or int64: where many
    equal magnitudes straddle a top-k cut, the kept ones are the last by index); rank: stable
    magnitude rank > cut (`ranks` as fp32); bernoulli u < cut; della u < q = cut + slope * rank (then
    divided by q when `rescale`). Factors multiply the kept entries (the weight, or weight / density).
    With `l1` (mergekit's L1 rescaling of DARE/DELLA), per input a ratio follows the divisor:
    before / after of `sparsify.rescale_l1`, computed beforehand (`rescale.L1Ratios`); kept entries are
    then `delta * keep * ratio * weight`, the eager order of operations. With `finite` it returns
    whether every written entry is finite (0-d bool), reduced in the same loop as the write: the
    finite check of `run_plan` without another read of the output."""
    n = len(deltas)
    cuts, slopes, factors, weights = (scalars[k * n : (k + 1) * n] for k in range(4))
    ratios = scalars[4 * n + 2 : 5 * n + 2]
    weighted = []
    for i, delta in enumerate(deltas):
        if sparsifier == "none":
            weighted.append(delta * factors[i])
        elif sparsifier == "magnitude":
            weighted.append(torch.where(delta.abs() >= cuts[i], delta * factors[i], 0.0))
        elif sparsifier == "magnitude_index":  # ties at the cut: those from flat index ranks[i] on
            magnitude = delta.abs()
            index = torch.arange(delta.numel(), dtype=ranks[i].dtype, device=delta.device).view(delta.shape)
            keep = (magnitude > cuts[i]) | ((magnitude == cuts[i]) & (index >= ranks[i]))
            weighted.append(torch.where(keep, delta * factors[i], 0.0))
        elif sparsifier == "rank":  # ranks and cuts are integers in fp32: the clamp is a 0/1 factor
            keep = (ranks[i] - cuts[i]).clamp(0.0, 1.0)
            weighted.append(delta * (keep * factors[i]))
        elif sparsifier == "bernoulli":
            keep = (draws[i] - cuts[i]).floor().neg()
            weighted.append(delta * keep * ratios[i] * factors[i] if l1 else delta * (keep * factors[i]))
        else:
            probs = cuts[i] + slopes[i] * ranks[i].to(torch.float32)
            keep = (draws[i] - probs).floor().neg()
            if l1:
                weighted.append(delta * keep * ratios[i] * factors[i])
            else:
                scale = probs.clamp_min(1e-12).reciprocal() * factors[i] if rescale else factors[i]
                weighted.append(delta * (keep * scale))
    if consensus is not None:
        if consensus == "sum":
            score = weighted[0] + weighted[1] if len(weighted) > 1 else weighted[0]
            for w_delta in weighted[2:]:
                score = score + w_delta
        else:
            score = torch.zeros_like(weighted[0])
            for w_delta in weighted:
                score = score + torch.sign(w_delta)
        elected = score.sign().add(0.5).sign()
        agreeing = [w_delta.mul(elected).clamp(min=0).mul(elected) for w_delta in weighted]
        mixed = agreeing[0]
        for agreed in agreeing[1:]:
            mixed = mixed + agreed
        if normalize:
            # The weights of the agreeing entries, and 1 where none agrees. Compiled, a select is
            # the cheapest form; eager (flat.py), boolean tensors are slow, so arithmetic: |sign(a)|
            # is 1 where a != 0 (NaN stays NaN) and d + (1 - |sign(d)|) is d, or 1 at 0. Same values.
            compiled = torch.compiler.is_compiling()  # ties at 100M: 92 ms with the select, 121 without
            divisor = torch.zeros_like(mixed)
            for agreed, weight in zip(agreeing, weights, strict=True):
                divisor = divisor + (
                    torch.where(agreed != 0, weight, 0.0) if compiled else agreed.abs().sign() * weight
                )
            mixed = mixed / (
                divisor.masked_fill(divisor == 0, 1.0) if compiled else divisor + (1.0 - divisor.abs().sign())
            )
    else:
        mixed = weighted[0]
        for w_delta in weighted[1:]:
            mixed = mixed + w_delta
        if divided:
            mixed = mixed / scalars[4 * n + 1]
    if scaled:
        mixed = mixed * scalars[4 * n]
    base_fp32 = (base.to(input_dtype) if input_dtype is not None else base).to(torch.float32)
    result = mixed + base_fp32
    out.copy_(result)
    return torch.isfinite(result.to(out.dtype)).all() if finite else None


class DrawStore:
    """Uniform draws per (generator seed, shape, device), kept in a `ByteCache` (alone: up to
    `max_bytes`). They are exactly what `uniform_like` returns for that generator; a draw that
    does not fit is returned without being kept."""

    KIND = "draw"

    def __init__(self, max_bytes: int = DEFAULT_DRAW_CACHE_BYTES, cache: ByteCache | None = None):
        self.cache = cache if cache is not None else ByteCache(limits={self.KIND: max_bytes})

    @property
    def nbytes(self) -> int:
        return self.cache.kind_bytes(self.KIND)

    def _key(self, generator: torch.Generator, like: torch.Tensor) -> tuple:
        return (self.KIND, generator.initial_seed(), tuple(like.shape), str(like.device))

    def keys(
        self, generators: Sequence[torch.Generator | None], shape: Sequence[int], device: torch.device
    ) -> list[tuple[tuple, int]]:
        """(cache key, bytes) of the fp32 draws of `generators` for a tensor of `shape` on `device`,
        for a `ByteCache.reserve` together with the task vectors they are used with."""
        like = torch.empty(tuple(shape), device="meta")
        size = like.numel() * 4
        return [((self.KIND, g.initial_seed(), tuple(like.shape), str(device)), size) for g in generators if g]

    def get(self, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        key = self._key(generator, like)
        draws = self.cache.get(key)
        if draws is None:
            draws = uniform_like(like, generator)
            self.cache.put(key, draws, draws.numel() * draws.element_size())
        return draws


@dataclass
class _Scalars:
    """Per-input kernel arguments for one job (see `_kernel`)."""

    cuts: list[float]
    slopes: list[float]
    factors: list[float]
    tied: list[torch.Tensor | None]  # flat indices of kept entries equal to a magnitude cut
    values: list[float] = field(default_factory=list)  # magnitude: the cut value v itself
    starts: list[int] = field(default_factory=list)  # magnitude: first flat index of a kept |d| == v
    l1: bool = False  # DARE/DELLA with L1 rescaling: `ratios` still to be filled (see `_kernel`)
    ratios: list[float] = field(default_factory=list)

    def by_index(self) -> _Scalars:
        """The same cut as `magnitude_index` takes it: |d| > v, or == v from index `starts[i]`."""
        return replace(self, cuts=list(self.values), tied=[None] * len(self.tied))


class TopkCut(NamedTuple):
    """A magnitude top-k of one input: keep |d| >= `cut` plus the flat indices `tied`, or
    equivalently |d| > `value`, and |d| == `value` from flat index `start` on. The streamed
    selection (stream.py) does not list the tied entries (`tied` None, `cut` = `value`): only the
    index form is exact there."""

    cut: float
    tied: torch.Tensor | None
    value: float
    start: int


TIE_PATCH_MAX = 1 << 14  # more kept tied entries than this (bf16 deltas): an index compare instead


class FusedTaskVectors:
    """Writes task-vector jobs straight into resident parameters with the compiled kernel.

    `write` returns False whenever the job needs something the kernel does not do; the caller
    then runs the eager method, so every recipe still materialises."""

    def __init__(self, draws: DrawStore | None = None):
        self.draws = draws or DrawStore()
        self._compiled: Callable[..., None] | None = None
        self.disabled = False  # set when the kernel cannot be compiled here (no C++ compiler, ...)
        self.fused_jobs = 0
        self.eager_jobs = 0
        self.index_jobs = 0  # TIES jobs whose ties at the cut were kept by an index compare
        self.finite = True  # whether the last job `write` wrote holds only finite values
        self.l1 = L1Ratios()

    @staticmethod
    def covers(plan: MergePlan) -> bool:
        return plan.method.name in _METHODS and plan.prepared is None

    def kernel(self) -> Callable[..., None]:
        """The compiled `_kernel` (compiled on first use)."""
        if self._compiled is None:
            import torch._dynamo

            config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, limit, max(getattr(config, limit), 64))  # one graph per method shape
            # Without emulate_precision_casts Inductor skips the rounding of `.to(bfloat16).to(float32)`
            # (a recipe's `dtype`), and the bits would differ from the eager methods'.
            self._compiled = torch.compile(
                _kernel, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
            )
        return self._compiled

    def write(
        self,
        plan: MergePlan,
        job: TensorJob,
        caches: Sequence[DeltaCache] | None,
        base: torch.Tensor,
        target: torch.Tensor,
    ) -> bool:
        """Compute `job` from the resident `base` tensor and task-vector `caches` into `target`."""
        sparsifier, has_consensus = _METHODS[plan.method.name]
        scalars = None if self.disabled else _scalars(job, caches, sparsifier)
        if scalars is None or caches is None:
            self.eager_jobs += 1
            return False
        device = target.device
        deltas = [c.delta for c in caches]
        draws: list[torch.Tensor] = []
        if sparsifier in ("bernoulli", "della"):
            draws = [self.draws.get(g, d) for g, d in zip(plan.generators(job, device), deltas, strict=True)]
        ranks = [c.row_ranks for c in caches] if sparsifier == "della" else []
        tied = sum(t.numel() for t in scalars.tied if t is not None)
        if tied > max(TIE_PATCH_MAX, deltas[0].numel() // 100):  # bf16 deltas: patching would be slow
            sparsifier, scalars = "magnitude_index", scalars.by_index()
            ranks = [index_scalar(start, deltas[0].numel(), device) for start in scalars.starts]
            self.index_jobs += 1
        consensus, normalize, rescale = job_flags(job, has_consensus)
        if scalars.l1:
            try:
                ratios = self.l1.ratios([c.delta for c in caches], draws, ranks, scalars.cuts, scalars.slopes)
            except Exception:  # compilation fails before anything is written
                if self.fused_jobs:
                    raise
                self.disable_after_failure()
                ratios = None
            if ratios is None:
                self.eager_jobs += 1
                return False
            scalars.ratios, rescale = ratios, False  # the ratios replace the 1/q rescaling
        values = packed_scalars(job, scalars, consensus, normalize)
        packed = torch.tensor(values, dtype=torch.float32, device=device)
        head = 4 * len(deltas)  # lambda and divisor follow the per-input rows
        flags = (
            consensus,
            normalize,
            rescale,
            values[head] != 1.0,
            normalize and consensus is None,
            plan.input_dtype,
            scalars.l1,
        )
        try:
            finite = self.kernel()(target, base, deltas, draws, ranks, packed, sparsifier, *flags, finite=True)
        except Exception:  # compilation fails before anything is written
            if self.fused_jobs:
                raise
            self.disable_after_failure()
            self.eager_jobs += 1
            return False
        self.finite = bool(finite)
        if any(t is not None for t in scalars.tied):
            patch = patch_tied(target, base, lambda i, at: deltas[i].reshape(-1)[at], scalars, packed, flags)
            self.finite = self.finite and bool(torch.isfinite(patch).all())
        self.fused_jobs += 1
        return True

    def disable_after_failure(self) -> None:
        """The kernel cannot be compiled here (no C++ compiler, ...): eager from now on, said once."""
        import sys

        log.warning("fused merge kernels unavailable, using eager methods: %s", str(sys.exc_info()[1]).splitlines()[0])
        self.disabled = True


def patch_tied(
    target: torch.Tensor,
    base: torch.Tensor,
    delta_at: Callable[[int, torch.Tensor], torch.Tensor],
    scalars: _Scalars,
    packed: torch.Tensor,
    flags: tuple,
) -> torch.Tensor:
    """Recompute the entries of `target` where kept magnitudes tie at a top-k cut (the kernel kept
    only those strictly above it) with the same function, eager, and write them over.
    `delta_at(i, flat_indices)` gives input i's task vector at those entries; returns what it wrote."""
    device = target.device
    at = torch.unique(torch.cat([t for t in scalars.tied if t is not None])).to(device)
    masked = []
    for i, (cut, tied) in enumerate(zip(scalars.cuts, scalars.tied, strict=True)):
        picked = delta_at(i, at)
        keep = picked.abs() >= cut
        if tied is not None:
            keep |= torch.isin(at, tied.to(device))
        masked.append(picked * keep.to(torch.float32))
    patch = torch.empty(at.numel(), dtype=target.dtype, device=device)
    _kernel(patch, base.reshape(-1)[at], masked, [], [], packed, "none", *flags)
    target.view(-1)[at] = patch
    return patch


def index_scalar(start: int, numel: int, device: torch.device) -> torch.Tensor:
    """A flat-index threshold for `magnitude_index`: int32 where the indices fit (a cheaper compare)."""
    dtype = torch.int32 if numel < 2**31 - 1 and -(2**31) <= start < 2**31 - 1 else torch.int64
    return torch.tensor(start, dtype=dtype, device=device)


def job_flags(job: TensorJob, has_consensus: bool) -> tuple[str | None, bool, bool]:
    """(consensus, normalize, rescale) of one job, as `_kernel` takes them."""
    return (
        str(job.params.get("consensus", "sum")) if has_consensus else None,
        bool(job.params.get("normalize", False)),
        bool(job.params.get("rescale", False)),
    )


def packed_scalars(job: TensorJob, scalars: _Scalars, consensus: str | None, normalize: bool) -> list[float]:
    """`_kernel`'s scalars for one job: per input its cut, slope, factor and weight, then lambda and
    the divisor of a normalised sum without sign election (1.0 otherwise)."""
    weights = [float(p["weight"]) for p in job.input_params]
    divisor = 1.0
    if normalize and consensus is None:
        total = sum(weights)
        divisor = 1.0 if abs(total) < 1e-8 else total
    lam = float(job.params.get("lambda", 1.0))
    return [*scalars.cuts, *scalars.slopes, *scalars.factors, *weights, lam, divisor, *scalars.ratios]


def _scalars(job: TensorJob, caches: Sequence[DeltaCache] | None, sparsifier: str) -> _Scalars | None:
    """The kernel's per-input scalars from resident task-vector caches, or None where the eager
    method must run."""
    if caches is None or job.base is None or len(caches) != len(job.inputs):
        return None

    def cut(i: int, density: float) -> TopkCut | None:
        cache = caches[i]
        if cache.sorted_abs is None or cache.sorted_order is None:
            return None
        return _topk_cut(cache.sorted_abs, cache.sorted_order, density)

    return job_scalars(job, caches[0].delta, sparsifier, cut, all(c.row_ranks is not None for c in caches), l1_ok=True)


def job_scalars(
    job: TensorJob,
    like: torch.Tensor,
    sparsifier: str,
    topk_cut: Callable[[int, float], TopkCut | None],
    have_ranks: bool,
    l1_ok: bool = False,
) -> _Scalars | None:
    """Per-input scalars of one job (`like`: any tensor of the job's shape, meta is enough);
    `topk_cut(i, density)` gives input i's magnitude cut (see `_topk_cut`). DARE/DELLA with L1
    rescaling only where the caller fills the ratios (`l1_ok`: whole-tensor sums first)."""
    rescale = bool(job.params.get("rescale", False))
    norm = job.params.get("rescale_norm", "l1")
    l1 = rescale and norm == "l1" and sparsifier in ("bernoulli", "della")
    if rescale and (sparsifier in ("magnitude", "rank") or (norm != "inverse" and not (l1 and l1_ok))):
        return None  # L1 rescaling needs whole-tensor norms first
    keep_all = {"none": 0.0, "magnitude": float("-inf"), "rank": -1.0, "bernoulli": 1.0, "della": 1.0}[sparsifier]
    scalars = _Scalars([], [], [], [], l1=l1)
    for i, p in enumerate(job.input_params):
        weight = float(p["weight"])
        density = float(p.get("density", 1.0))
        cut, tied, slope, factor = keep_all, None, 0.0, weight
        value, start = keep_all, 0
        if sparsifier == "none" or density >= 1:
            pass  # every sparsifier keeps everything at density 1, without rescaling
        elif density <= 0:
            return None  # eager returns exact zeros; the kernel would give -0.0 for negative entries
        elif sparsifier == "magnitude":
            found = topk_cut(i, density)
            if found is None:
                return None
            cut, tied, value, start = found
        elif sparsifier == "rank":  # keep the stable ranks n - k .. n - 1
            n = like.numel()
            cut = float(n - topk_count(density, n) - 1)
        elif sparsifier == "bernoulli":
            cut = density
            factor = weight / density if rescale and not l1 else weight
        else:
            ramp = della_ramp(like, density, float(p.get("epsilon", 0.15)))
            if ramp is None or not have_ranks:
                return None  # eager uses a constant probability tensor here
            cut, slope = ramp
        scalars.cuts.append(cut)
        scalars.tied.append(tied)
        scalars.values.append(value)
        scalars.starts.append(start)
        scalars.slopes.append(slope)
        scalars.factors.append(factor)
    return scalars


def _topk_cut(sorted_abs: torch.Tensor, sorted_order: torch.Tensor, density: float) -> TopkCut:
    """The `topk_count(density, n)` largest |delta| by stable rank: those with |delta| >= c, plus
    the entries at the flat indices `tied` (None when no equal magnitudes straddle the cut). A
    stable sort orders ties by index, so the kept tied entries are the sorted positions from n - k
    to the last one equal to the cut value v (ascending flat indices); then c is just above v."""
    n = sorted_abs.numel()
    k = topk_count(density, n)
    if k >= n:
        return TopkCut(float("-inf"), None, float("-inf"), 0)
    value = sorted_abs[n - k]
    if float(value) == 0.0 or float(sorted_abs[n - k - 1]) != float(value):
        return TopkCut(float(value), None, float(value), 0)  # no tie, or tied zeros (kept zeros change nothing)
    last = int(torch.searchsorted(sorted_abs, value, right=True))
    above = torch.nextafter(value, torch.tensor(float("inf"), dtype=value.dtype, device=value.device))
    tied = sorted_order[n - k : last].to(torch.int64)
    return TopkCut(float(above), tied, float(value), int(tied[0]))


def fused_available(mode: KernelMode, parameters: int) -> bool:
    """Whether to try the compiled kernels for plans of this size."""
    if mode == "eager":
        return False
    return mode == "compiled" or parameters >= AUTO_MIN_PARAMETERS
