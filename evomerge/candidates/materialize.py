"""Turn a recipe into a scorable in-memory model: the search worker's side of "one plan, two sinks".

    materializer = Materializer(["zoo/base", "zoo/add", "zoo/rev"], device="cpu")
    candidate = materializer.apply(recipe, seed=7)     # a Recipe or its mergekit-schema dict
    candidate.model(input_ids)                          # a transformers causal LM

Parameter-space recipes are planned by `plan_merge` (`PlanCache`) and run by `run_plan` with the method
functions of `evomerge merge`; only the sink differs: `ModuleSink` copies each merged tensor into
one resident transformers model (reused by every candidate with the same output config) instead
of writing safetensors. Inputs come from resident source tensors, and task-vector methods read
resident task vectors and their sort data (`DeltaStore`), so a TIES top-k at any density is a
threshold lookup. The resulting weights are bit-identical to the file merge.

For large models the task-vector methods run as one compiled kernel per tensor that writes the
resident parameter directly (fused.py); for tiny ones (the toy zoo), as one eager pass over all
tensors concatenated (flat.py); `kernels="auto"|"compiled"|"eager"` picks. All give the same values.

Layer-stacking (DFS) recipes that are folded layer paths are not copied at all: see stacked.py.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.candidates.budget import MIN_WORKSPACE_BYTES, ByteCache, CacheMode, cache_mode, gb, parse_budget
from evomerge.candidates.flat import MAX_PARAMETERS as FLAT_MAX_PARAMETERS
from evomerge.candidates.flat import FlatTaskVectors
from evomerge.candidates.fused import (
    DEFAULT_DRAW_CACHE_BYTES,
    DrawStore,
    FusedTaskVectors,
    KernelMode,
    fused_available,
    kernel_mode,
)
from evomerge.candidates.resident import DeltaStore, ResidentModel, ResidentSource, build_module
from evomerge.candidates.stacked import build_stacked, layer_input_scales
from evomerge.candidates.stream import StreamedTaskVectors
from evomerge.errors import EvomergeError
from evomerge.merge.jobs import MergePlan, ModelCatalog, TensorJob
from evomerge.merge.plan import PlanCache
from evomerge.merge.recipe import Recipe, parse_recipe
from evomerge.merge.runner import assert_finite, run_plan
from evomerge.merge.vocabulary import AlignedTensors


class ModuleSink:
    """`merge.TensorSink` that writes each output tensor into a resident model, in place.

    `begin` checks once per plan layout that the plan writes every parameter of the model (a tied
    output embedding counts as written with its input embedding) with the right shape and dtype,
    so no stale weights of an earlier candidate can survive into a new one."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        self._checked: set[tuple[str, ...]] = set()
        self._expected = 0
        self._written = 0
        self.complete = False

    def begin(self, plan: MergePlan) -> None:
        names = tuple(job.name for job in plan.jobs)
        if names not in self._checked:
            self._add_checkpoint_names(plan)
            self._check_layout(plan.jobs)
            self._checked.add(names)
        self._expected, self._written, self.complete = len(plan.jobs), 0, False

    def _add_checkpoint_names(self, plan: MergePlan) -> None:
        """Plans name tensors as checkpoints do; where transformers renames them on load (the
        family's `module_renames`), the checkpoint name is an alias of the module's tensor."""
        arch = plan.models[0].arch
        for job in plan.jobs:
            if job.name not in self._targets and arch.module_name(job.name) in self._targets:
                self._targets[job.name] = self._targets[arch.module_name(job.name)]

    def _check_layout(self, jobs: Sequence[TensorJob]) -> None:
        for job in jobs:
            target = self._targets.get(job.name)
            if target is None:
                raise ValueError(f"ModuleSink: the model has no tensor {job.name!r}")
            if tuple(target.shape) != tuple(job.shape) or target.dtype != job.out_dtype:
                raise ValueError(
                    f"ModuleSink: {job.name} is {list(target.shape)} {target.dtype} in the model, "
                    f"{list(job.shape)} {job.out_dtype} in the plan"
                )
        written = {self._targets[job.name].data_ptr() for job in jobs}
        stale = [n for n, p in self.model.named_parameters() if p.data_ptr() not in written]
        if stale:
            raise ValueError(f"ModuleSink: the plan does not write {stale[:3]}")

    def write(self, job: TensorJob, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self._targets[job.name].copy_(tensor)
        self._written += 1

    def target(self, job: TensorJob) -> torch.Tensor:
        """The parameter a fused kernel writes `job` into (then `written_directly`)."""
        return self._targets[job.name].data

    def written_directly(self, job: TensorJob) -> None:
        self._written += 1

    def commit(self) -> None:
        if self._written != self._expected:
            raise RuntimeError(f"ModuleSink: {self._written} of {self._expected} tensors written")
        self.complete = True

    def abort(self) -> None:
        self.complete = False  # the model holds a partial candidate until the next full write


@dataclass
class Materialized:
    """A candidate ready to score. `mode`: "in_place" (weights written into a resident model) or
    "stacked" (a layer path over resident tensors, nothing copied)."""

    model: torch.nn.Module
    plan: MergePlan
    mode: str
    tokenizer_path: Path
    seconds: float


class Materializer:
    """Holds the source models of a search on one device and materialises recipes over them.

    `models` are loaded up front; a recipe that names another model loads it on first use.
    `search_dirs` resolve relative model references (after the current directory). At most
    `max_targets` in-place target models (one per distinct output config) are kept.
    `kernels` picks how task-vector candidates are computed: `auto` (the default, or
    `$EVOMERGE_KERNELS`) runs the compiled per-tensor kernels (fused.py) for models of at least 20M
    parameters, one flat eager pass over all tensors (flat.py) for plans of at most 400K, and the
    method functions tensor by tensor in between; `compiled` always compiles; `eager` runs the
    method functions tensor by tensor, exactly as `evomerge merge` does.

    Memory (budget.py, docs/memory.md): `cache` is `full` (every cache kept; mask draws up to
    `draw_cache_bytes`), `budgeted` (caches share what `memory_budget` leaves after sources,
    candidate targets and a workspace reserve; the rest is streamed per candidate, stream.py) or
    `minimal` (no caches). `memory_budget` alone means `budgeted`; a budget below the sources plus
    one candidate is refused. `mmap` maps CPU sources from their files (shared between workers)
    instead of copying them. Every mode gives the same candidate, bit for bit."""

    def __init__(
        self,
        models: Sequence[str | Path] = (),
        *,
        device: str | torch.device = "cpu",
        search_dirs: Sequence[Path] = (),
        max_targets: int = 2,
        kernels: KernelMode | None = None,
        draw_cache_bytes: int | None = None,
        cache: CacheMode | None = None,
        memory_budget: int | str | None = None,
        mmap: bool = True,
    ):
        self.device = torch.device(device)
        self.catalog = ModelCatalog([Path(d) for d in search_dirs])
        self.plans = PlanCache(self.catalog)
        self.memory_budget = parse_budget(memory_budget)
        self.cache_mode = cache_mode(cache, self.memory_budget)
        self.mmap = mmap
        if self.cache_mode == "full":
            limits = {DrawStore.KIND: draw_cache_bytes if draw_cache_bytes is not None else DEFAULT_DRAW_CACHE_BYTES}
            self.pool = ByteCache(None, limits)
        else:  # budgeted: sized once sources and targets are known (`_size_pool`)
            self.pool = ByteCache(0)
        self.deltas = DeltaStore(self.pool)
        self.kernels = kernel_mode(kernels)
        self.fused = FusedTaskVectors(DrawStore(cache=self.pool))
        self.flat = FlatTaskVectors(self.pool)
        self.stream = StreamedTaskVectors(self.fused)
        self.max_targets = max_targets
        self._residents: dict[Path, ResidentModel] = {}
        self._targets: OrderedDict[str, tuple[torch.nn.Module, ModuleSink]] = OrderedDict()
        self._generation_configs: dict[Path, Any] = {}
        self.aligned = AlignedTensors()  # vocabulary rows re-indexed to merged vocabularies, kept resident
        self._tokenizer_dirs: dict[str, Path] = {}
        self._scratch: Path | None = None
        for i, model in enumerate(models):
            self.resident(str(model), f"models[{i}]")
        if self._residents:
            self._check_budget(max(m.nbytes for m in self._residents.values()))

    def resident(self, reference: str, where: str = "model") -> ResidentModel:
        path = self.catalog.resolve(reference, where).path
        model = self._residents.get(path)
        if model is None:
            model = self._residents[path] = ResidentModel.load(path, self.device, mmap=self.mmap)
        return model

    @property
    def resident_bytes(self) -> int:
        return sum(m.nbytes for m in self._residents.values())

    @property
    def target_bytes(self) -> int:
        return sum(_module_bytes(model) for model, _ in self._targets.values())

    def _check_budget(self, candidate_bytes: int) -> None:
        """Refuse a budget that cannot hold the sources plus one candidate (one line, the field)."""
        if self.memory_budget is None:
            return
        needed = self.resident_bytes + candidate_bytes
        if needed > self.memory_budget:
            raise EvomergeError(
                f"memory_budget: {gb(self.memory_budget)} cannot hold the sources ({gb(self.resident_bytes)}) "
                f"plus one candidate ({gb(candidate_bytes)}); give at least {gb(needed)}"
            )

    def _size_pool(self, plan: MergePlan) -> None:
        """Under `budgeted`, caches get the budget minus sources, targets and the workspace reserve
        (`workspace_bytes`); entries over a shrunk budget are dropped, oldest first."""
        if self.cache_mode != "budgeted":
            return
        assert self.memory_budget is not None
        left = self.memory_budget - self.resident_bytes - self.target_bytes - workspace_bytes(plan)
        self.pool.resize(max(0, left))

    def plan(self, recipe: Recipe | Mapping[str, Any], seed: int | None = None) -> MergePlan:
        if not isinstance(recipe, Recipe):
            recipe = parse_recipe(recipe)
        return self.plans.plan(recipe, seed)

    def apply(self, recipe: Recipe | Mapping[str, Any], seed: int | None = None) -> Materialized:
        """Plan `recipe` (validation errors are `EvomergeError`s naming the field) and build it."""
        started = time.perf_counter()
        plan = self.plan(recipe, seed)
        self.pool.tick()
        residents = [self._residents.get(m.path) or self.resident(str(m.path)) for m in plan.models]
        generation_config = self._generation_config(plan.models[plan.donor].path)
        scales = layer_input_scales(plan, residents)
        if scales is not None:
            model, mode = build_stacked(plan, residents, scales, generation_config), "stacked"
        else:
            model, mode = self._write_in_place(plan, residents, generation_config), "in_place"
        return Materialized(model, plan, mode, self._tokenizer_path(plan), time.perf_counter() - started)

    def _tokenizer_path(self, plan: MergePlan) -> Path:
        """Where the candidate's tokenizer lives: the tokenizer model's directory, or for a merged
        vocabulary a folder in this materializer's scratch directory, written once per vocabulary."""
        vocabulary = plan.vocabulary
        if vocabulary is None:
            return plan.models[plan.tokenizer_model].path
        path = self._tokenizer_dirs.get(vocabulary.key)
        if path is None:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="evomerge-vocabulary-"))
                weakref.finalize(self, shutil.rmtree, self._scratch, True)
            path = self._scratch / vocabulary.key
            if not path.is_dir():
                partial = self._scratch / f".{vocabulary.key}.partial"
                partial.mkdir()
                vocabulary.save(partial)
                partial.rename(path)
            self._tokenizer_dirs[vocabulary.key] = path
        return path

    def _write_in_place(
        self, plan: MergePlan, residents: Sequence[ResidentModel], generation_config: Any
    ) -> torch.nn.Module:
        model, sink = self._target(plan)
        self._size_pool(plan)
        if generation_config is not None:
            model.generation_config = generation_config
        source = ResidentSource(plan, residents, self.aligned)
        fields = plan.method.extra.get("delta_cache")
        fusable = fields is not None and self.fused.covers(plan)
        fused = fusable and fused_available(self.kernels, plan.parameters)
        # Jobs whose caches do not fit are streamed (no cached data); `eager` runs the methods.
        streamed = fusable and self.kernels != "eager" and self.cache_mode != "full"
        if fused and "sorted_abs" in fields:
            fields = (*fields, "sorted_order")  # the kernel's top-k cut needs the index order of ties
        random = plan.method.random

        def caches(job: TensorJob) -> list | None:
            if job.base is None:
                return None
            draws = []
            if fused and random and self.cache_mode != "full":  # the kernel's draws share the budget
                draws = self.fused.draws.keys(plan.generators(job, self.device), job.shape, self.device)
            return self.deltas.caches(plan, job, source, fields, also=draws)

        if fields is None:
            caches = None  # type: ignore[assignment]
        direct = None
        flat = None
        small = plan.parameters <= FLAT_MAX_PARAMETERS and self.cache_mode != "minimal"
        if caches is not None and self.kernels == "auto" and not fused and small:
            flat = self.flat.compute(plan, caches, source)
        if flat is not None:

            def direct(job: TensorJob) -> bool:
                sink.target(job).copy_(flat[job.name])
                assert_finite(job, sink.target(job))
                sink.written_directly(job)
                return True

        elif fused or streamed:

            def direct(job: TensorJob) -> bool:
                if job.base is None:
                    return False
                job_caches = caches(job)  # type: ignore[misc]
                if job_caches is not None:
                    if not fused or not self.fused.write(plan, job, job_caches, source.get(job.base), sink.target(job)):
                        return False  # the method runs with the cached task vectors
                    if not self.fused.finite:  # the kernel reduced it while writing
                        assert_finite(job, sink.target(job))  # raises, naming the tensor
                elif not streamed or not self.stream.write(plan, job, source, sink.target(job), compiled=fused):
                    return False
                else:
                    assert_finite(job, sink.target(job))
                sink.written_directly(job)
                return True

        with torch.no_grad():
            run_plan(plan, sink, source, device=self.device, caches=caches, direct=direct, direct_checks_finite=True)
        return model

    def _target(self, plan: MergePlan) -> tuple[torch.nn.Module, ModuleSink]:
        """The resident model that in-place candidates with this output config are written into."""
        dtypes = {job.out_dtype for job in plan.jobs}
        if len(dtypes) != 1:
            raise ValueError(f"in-memory merge needs one output dtype, the plan has {sorted(map(str, dtypes))}")
        key = json.dumps(plan.out_config, sort_keys=True, default=str)
        entry = self._targets.get(key)
        if entry is None:
            dtype = dtypes.pop()
            new_bytes = plan.total_bytes
            self._check_budget(new_bytes)
            while self._targets and (
                len(self._targets) >= self.max_targets
                or (
                    self.memory_budget is not None
                    and self.resident_bytes + self.target_bytes + new_bytes > self.memory_budget
                )
            ):
                self._targets.popitem(last=False)
            model = build_module(plan.out_config, self.device, dtype)
            entry = self._targets[key] = (model, ModuleSink(model))
        self._targets.move_to_end(key)
        return entry

    def _generation_config(self, path: Path) -> Any:
        """The donor's generation_config.json, which `evomerge merge` copies next to the weights."""
        if path not in self._generation_configs:
            config = None
            if (path / "generation_config.json").is_file():
                from transformers import GenerationConfig

                config = GenerationConfig.from_pretrained(path)
            self._generation_configs[path] = config
        return self._generation_configs[path]


def workspace_bytes(plan: MergePlan) -> int:
    """Memory a budget keeps free for the tensor being merged: building one tensor's cache (its
    fp32 task vector, |delta| and a stable sort's int64 order) or an eager method's temporaries
    take about three fp32 copies of the largest tensor; streamed jobs need a few chunks."""
    largest = max((math.prod(job.shape) for job in plan.jobs), default=0)
    return max(MIN_WORKSPACE_BYTES, 3 * 4 * largest)


def _module_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
