"""Source models held in memory by a search worker, and what candidates share about them.

A worker loads each source model once: its checkpoint tensors, bit for bit in their stored dtype,
on the worker's device, plus a transformers module whose parameters alias those tensors (no
second copy; layer stacking borrows its layers). Task vectors and their sort data are computed
the first time a recipe needs them and then reused by every later candidate (`DeltaStore`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from evomerge.candidates.budget import ByteCache
from evomerge.io.architecture import detect_architecture
from evomerge.io.checkpoint import CheckpointReader
from evomerge.merge.jobs import MergePlan, TensorJob, TensorRef
from evomerge.merge.methods.base import DeltaCache
from evomerge.merge.methods.sparsify import stable_row_ranks
from evomerge.merge.vocabulary import AlignedTensors


def build_module(config: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """An uninitialised transformers model for `config` (weights are overwritten by the caller)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = AutoConfig.for_model(**config)
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tying that from_config normally does
    return model.eval().requires_grad_(False)


def module_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating tensors have (what the module is built in)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


class ResidentModel:
    """One source model in memory: checkpoint tensors (by checkpoint name) and, built on first use,
    a module whose parameters alias them (parameter-space merges never need the module)."""

    def __init__(self, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.path = path
        self.config = config
        self.tensors = tensors
        self._module: torch.nn.Module | None = None

    @classmethod
    def load(cls, path: Path, device: torch.device | str, *, mmap: bool = True) -> ResidentModel:
        """Read the checkpoint onto `device`. On CPU with `mmap` the tensors are views of the
        safetensors files mapped copy-on-write (`safe_open`): workers on one node that load the
        same sources share those pages (the page cache), and a tensor not read costs nothing."""
        reader = CheckpointReader(path, str(path))
        try:
            if mmap and torch.device(device).type == "cpu":
                from safetensors import safe_open

                files: dict[Path, Any] = {}
                tensors = {}
                for name in reader.names():
                    shard = reader.shard_path(name)
                    if shard not in files:
                        files[shard] = safe_open(str(shard), framework="pt")
                    tensors[name] = files[shard].get_tensor(name)
            else:
                tensors = {name: reader.get(name).to(device) for name in reader.names()}
        finally:
            reader.close()
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return cls(path, config, tensors)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def module(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self._build_module()
        return self._module

    def _build_module(self) -> torch.nn.Module:
        module = build_module(self.config, self.device, module_dtype(self.tensors))
        arch = detect_architecture(self.config, str(self.path))  # checkpoint names -> module names
        by_module_name = {arch.module_name(name): tensor for name, tensor in self.tensors.items()}
        _missing, unexpected = module.load_state_dict(by_module_name, strict=False, assign=True)
        if unexpected:
            raise ValueError(f"{self.path}: checkpoint tensors the model does not have: {unexpected[:3]}")
        module.tie_weights()  # a tied lm_head follows the embeddings just assigned
        aliased = {t.data_ptr() for t in self.tensors.values()}
        left = [n for n, p in module.named_parameters() if p.data_ptr() not in aliased]
        if left:
            raise ValueError(f"{self.path}: parameters missing from the checkpoint: {left[:3]}")
        return module

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ResidentSource:
    """`merge.TensorSource` over resident models for one plan (plan model index -> resident model)."""

    def __init__(self, plan: MergePlan, residents: Sequence[ResidentModel], aligned: AlignedTensors | None = None):
        self.models = list(residents)
        if len(self.models) != len(plan.models):
            raise ValueError("one resident model per plan model is required")
        self.aligned = aligned if aligned is not None else AlignedTensors()

    def get(self, ref: TensorRef) -> torch.Tensor:
        if ref.vocabulary is not None:  # rows re-indexed to the merged vocabulary, once per worker
            return self.aligned.get(ref, self.get)
        return self.models[ref.model].tensors[ref.name]


@dataclass(frozen=True)
class _DeltaKey:
    model: Path
    name: str
    base: Path
    base_name: str
    input_dtype: torch.dtype | None
    vocabulary: str | None = None  # the alignment of vocabulary rows (merge.vocabulary), if any


class DeltaStore:
    """Task vectors `theta_i - theta_base` (fp32) and their sort data, built once per tensor.

    The arithmetic is exactly what a method does on loaded inputs (round to the recipe's `dtype`
    if any, upcast to fp32, subtract), so cached and uncached merges are bit-identical. Which
    fields are built follows the method's declaration (`extra["delta_cache"]` in the registry).
    Entries live in a `ByteCache`; under a budget a job whose entries do not fit gets None (its
    inputs are then read and merged per candidate, or streamed by the fused path).
    """

    KIND = "delta"

    def __init__(self, cache: ByteCache | None = None) -> None:
        self.cache = cache if cache is not None else ByteCache()
        self.build_seconds = 0.0

    def __len__(self) -> int:
        return self.cache.kind_count(self.KIND)

    @property
    def nbytes(self) -> int:
        return self.cache.kind_bytes(self.KIND)

    def caches(
        self,
        plan: MergePlan,
        job: TensorJob,
        source: ResidentSource,
        fields: Sequence[str],
        also: Sequence[tuple[Any, int]] = (),
    ) -> list[DeltaCache] | None:
        """One cache per input of `job`, or None when the job has no base (nothing to cache) or
        its entries do not fit in the cache's budget together with the entries `also` (the job's
        mask draws: keys and bytes), for which room is then made too."""
        if job.base is None:
            return None
        base = job.base
        wanted = {f for f in fields if f in ("sorted_abs", "row_ranks", "sorted_order")}
        keys = [self._key(plan, base, ref, source) for ref in job.inputs]
        sizes = []
        for key in keys:
            cached = self.cache.get(key)
            present = set() if cached is None else {f for f in _FIELDS if getattr(cached, f) is not None}
            sizes.append((key, _cache_bytes(math.prod(job.shape), present | wanted | {"delta"})))
        if not self.cache.reserve([*sizes, *also]):
            return None
        return [self._get(plan, key, base, ref, source, wanted) for key, ref in zip(keys, job.inputs, strict=True)]

    def _key(self, plan: MergePlan, base: TensorRef, ref: TensorRef, source: ResidentSource) -> tuple:
        return (
            self.KIND,
            _DeltaKey(
                source.models[ref.model].path,
                ref.name,
                source.models[base.model].path,
                base.name,
                plan.input_dtype,
                ref.vocabulary.key if ref.vocabulary is not None else None,
            ),
        )

    def _get(
        self, plan: MergePlan, key: tuple, base: TensorRef, ref: TensorRef, source: ResidentSource, wanted: set[str]
    ) -> DeltaCache:
        import time

        cache = self.cache.get(key)
        if cache is not None and all(getattr(cache, f) is not None for f in wanted):
            return cache
        started = time.perf_counter()
        if cache is None:
            delta = _fp32(source.get(ref), plan) - _fp32(source.get(base), plan)
            cache = DeltaCache(delta=delta)
        if "sorted_order" in wanted and cache.sorted_order is None:
            values, order = cache.delta.abs().reshape(-1).sort(stable=True)
            small = order.numel() < 2**31
            cache = replace(cache, sorted_abs=values, sorted_order=order.to(torch.int32) if small else order)
        if "sorted_abs" in wanted and cache.sorted_abs is None:
            cache = replace(cache, sorted_abs=cache.delta.abs().reshape(-1).sort().values)
        if "row_ranks" in wanted and cache.row_ranks is None:
            # int32 halves the memory; ranks are converted to fp32 before use, so values are equal.
            cache = replace(cache, row_ranks=stable_row_ranks(cache.delta.abs()).to(torch.int32))
        self.cache.put(key, cache, _nbytes(cache))  # room was reserved by `caches`
        self.build_seconds += time.perf_counter() - started
        return cache


_FIELDS = ("delta", "sorted_abs", "row_ranks", "sorted_order")


def _cache_bytes(numel: int, fields: set[str]) -> int:
    """Bytes of a `DeltaCache` with these fields (as `_get` builds them)."""
    if "sorted_order" in fields:
        fields = fields | {"sorted_abs"}  # one stable sort gives both
    per = {"delta": 4, "sorted_abs": 4, "row_ranks": 4, "sorted_order": 4 if numel < 2**31 else 8}
    return numel * sum(per[f] for f in fields)


def _nbytes(cache: DeltaCache) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in (cache.delta, cache.sorted_abs, cache.row_ranks, cache.sorted_order)
        if t is not None
    )


def _fp32(tensor: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    if plan.input_dtype is not None:
        tensor = tensor.to(plan.input_dtype)
    return tensor.to(torch.float32)
