"""Plan a recipe into per-tensor jobs: output name, sources, fully resolved parameters.

Planning reads config.json files and safetensors headers only (names, shapes, dtypes), never
tensor data, so every recipe error (missing tensor, shape mismatch, missing parameter for some
tensor) surfaces before the first tensor is read. A sink then consumes the jobs in order; the file
sink and the in-memory sink of the search workers share this planner and the method functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError, shown
from evomerge.io.architecture import output_config
from evomerge.io.checkpoint import dtype_name, parse_dtype
from evomerge.merge.jobs import MergePlan, ModelCatalog, ModelInfo, TensorJob, TensorRef
from evomerge.merge.methods.spec import MergeMethod
from evomerge.merge.recipe import OutputSlice, Parameters, Recipe, SliceSource, evaluate_setting
from evomerge.merge.validation import validate_recipe
from evomerge.merge.vocabulary import Vocabulary, VocabularyGroup, build_vocabulary, vocabulary_group

# -- planning -------------------------------------------------------------------------------------


@dataclass
class _Source:
    path: str  # recipe field path, for messages
    model: int
    layer_start: int
    parameters: Parameters | None


@dataclass
class _Slice:
    sources: list[_Source]
    base: int | None  # model index of the base within this slice, if any
    parameters: Parameters | None
    length: int
    align_base: int | None = None  # the recipe's (or slice's) base_model, even where the method ignores it


def plan_merge(recipe: Recipe, catalog: ModelCatalog, *, seed: int | None = None) -> MergePlan:
    """Validate `recipe` against the models and build every tensor job; reads no tensor data."""
    return _plan(recipe, catalog, seed)[0]


class PlanCache:
    """`plan_merge` for a stream of recipes that differ only in parameter values, as a search sends:
    the jobs (names, sources, shapes, dtypes) and the output config are planned once per recipe
    structure, and each recipe then only resolves its parameters per job. Every recipe is still
    validated in full, and the plan equals `plan_merge`'s (tested)."""

    MAX_ENTRIES = 8

    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog
        self._templates: dict[tuple[Any, ...], tuple[MergePlan, list[_JobOrigin]]] = {}

    def plan(self, recipe: Recipe, seed: int | None = None) -> MergePlan:
        key = _structure(recipe)
        template = self._templates.get(key)
        if template is None:
            plan, origins = _plan(recipe, self.catalog, seed)
            if len(self._templates) >= self.MAX_ENTRIES:
                self._templates.pop(next(iter(self._templates)))
            self._templates[key] = (plan, origins)
            return plan
        plan, origins = template
        method = validate_recipe(recipe)
        planner = _Planner(recipe, method, self.catalog)
        slices = [
            _Slice([_Source(path, -1, 0, parameters) for path, parameters in sources], None, slice_parameters, 0)
            for sources, slice_parameters in _parameter_scopes(recipe)
        ]
        jobs = []
        for job, origin in zip(plan.jobs, origins, strict=True):
            s = slices[origin.slice]
            input_params = [
                planner._model_params(s.sources[k], s, ref.name, origin.t)
                for k, ref in zip(origin.sources, job.inputs, strict=True)
            ]
            params = planner._global_params(s, job.name, origin.t)
            planner._check_resolved(job.name, input_params, params)
            jobs.append(dataclasses.replace(job, input_params=tuple(input_params), params=params))
        seed = _seed(recipe, seed)
        return dataclasses.replace(
            plan, recipe=recipe.with_seed(seed) if method.random else recipe, jobs=tuple(jobs), seed=seed
        )


@dataclass(frozen=True)
class _JobOrigin:
    """Where a job's parameters come from: its slice, the slice sources of its inputs, and t."""

    slice: int
    sources: tuple[int, ...]
    t: float


def _structure(recipe: Recipe) -> tuple[Any, ...]:
    """Everything of a recipe that decides its jobs and output config: all but parameter values."""
    models = tuple(m.model for m in recipe.models) if recipe.models is not None else None
    slices = (
        None
        if recipe.slices is None
        else tuple(
            (s.base_model, tuple((src.model, tuple(src.layer_range)) for src in s.sources)) for s in recipe.slices
        )
    )
    return (
        recipe.merge_method,
        recipe.base_model,
        models,
        slices,
        recipe.dtype,
        recipe.out_dtype,
        recipe.tokenizer_source,
        recipe.tokenizer.model_dump_json() if recipe.tokenizer is not None else None,
    )


def _parameter_scopes(recipe: Recipe) -> list[tuple[list[tuple[str, Parameters | None]], Parameters | None]]:
    """Per slice as `_Planner.normalize` numbers them: (field path, parameters) of each source, and
    the slice's own parameters."""
    if recipe.models is not None:
        # a base_model missing from models: is planned as a last source without parameters
        scopes = [(f"models[{i}]", m.parameters) for i, m in enumerate(recipe.models)]
        return [([*scopes, ("base_model", None)], None)]
    return [
        ([(f"slices[{i}].sources[{j}]", src.parameters) for j, src in enumerate(s.sources)], s.parameters)
        for i, s in enumerate(recipe.slices or [])
    ]


def _seed(recipe: Recipe, seed: int | None) -> int:
    return seed if seed is not None else (recipe.seed if recipe.seed is not None else 0)


def _plan(recipe: Recipe, catalog: ModelCatalog, seed: int | None) -> tuple[MergePlan, list[_JobOrigin]]:
    method = validate_recipe(recipe)
    seed = _seed(recipe, seed)
    planner = _Planner(recipe, method, catalog)
    slices = planner.normalize()
    donor = planner.model_index(recipe.base_model) if recipe.base_model else slices[0].sources[0].model
    referenced = [planner.model_index(reference) for reference in recipe.referenced_models()]
    vocabulary = build_vocabulary(
        recipe,
        planner.models,
        referenced,
        donor if recipe.base_model else referenced[0],
        planner.model_index,
        cache=catalog.vocabularies,
    )
    planner.vocabulary = vocabulary
    jobs = planner.jobs(slices)
    tokenizer_model = donor
    if recipe.tokenizer_source not in (None, "base", "union"):
        tokenizer_model = planner.model_index(recipe.tokenizer_source, "tokenizer_source")
    models = tuple(planner.models)
    out_dtype = jobs[0].out_dtype if jobs else torch.float32
    has_lm_head = any(j.name == models[donor].arch.lm_head for j in jobs)
    layer_sources = planner.layer_sources
    config = output_config(
        models[donor].config,
        models[donor].arch,
        [(models[m].config, layer) for m, layer in layer_sources],
        dtype_name=dtype_name(out_dtype),
        has_lm_head=has_lm_head,
    )
    if vocabulary is not None:
        config["vocab_size"] = vocabulary.size
    plan = MergePlan(
        recipe=recipe.with_seed(seed) if method.random else recipe,
        method=method,
        models=models,
        jobs=tuple(jobs),
        seed=seed,
        input_dtype=parse_dtype(recipe.dtype, "dtype") if recipe.dtype else None,
        out_config=config,
        donor=donor,
        tokenizer_model=tokenizer_model,
        layer_sources=layer_sources,
        vocabulary=vocabulary,
    )
    return plan, planner.origins


class _Planner:
    def __init__(self, recipe: Recipe, method: MergeMethod, catalog: ModelCatalog):
        self.recipe = recipe
        self.method = method
        self.catalog = catalog
        self.models: list[ModelInfo] = []
        self._index: dict[Path, int] = {}
        self.layer_sources: list[tuple[int, int]] = []
        self.origins: list[_JobOrigin] = []  # per job, in order (what PlanCache re-resolves)
        self._slice_index: dict[int, int] = {}
        self.out_dtype = (
            parse_dtype(recipe.out_dtype or recipe.dtype, "out_dtype") if (recipe.out_dtype or recipe.dtype) else None
        )
        self.input_dtype = parse_dtype(recipe.dtype, "dtype") if recipe.dtype else None
        self.vocabulary: Vocabulary | None = None

    def model_index(self, reference: str, where: str = "base_model") -> int:
        info = self.catalog.resolve(reference, where)
        if info.path not in self._index:
            if self.models and info.arch is not self.models[0].arch:
                raise EvomergeError(
                    f"{where}: {reference!r} is a {info.arch.family} model but "
                    f"{self.models[0].reference!r} is {self.models[0].arch.family}; "
                    "all models of a merge must share an architecture"
                )
            self._index[info.path] = len(self.models)
            self.models.append(info)
        return self._index[info.path]

    # recipe -> slices with model indices --------------------------------------------------------

    def normalize(self) -> list[_Slice]:
        r = self.recipe
        base = self.model_index(r.base_model) if r.base_model else None
        top_base = base
        if r.models is not None:
            sources = [
                _Source(f"models[{i}]", self.model_index(m.model, f"models[{i}].model"), 0, m.parameters)
                for i, m in enumerate(r.models)
            ]
            if self.method.base != "ignored" and base is not None and all(s.model != base for s in sources):
                sources.append(_Source("base_model", base, 0, None))
            if self.method.base in ("ignored", "input"):
                base = None
            reference = base if base is not None else sources[0].model
            length = self.models[reference].num_layers
            for s in sources:
                n = self.models[s.model].num_layers
                if n != length:
                    raise EvomergeError(
                        f"{s.path}.model: {self.models[s.model].reference!r} has {n} layers but "
                        f"{self.models[reference].reference!r} has {length}; use slices: with layer_range "
                        "to merge models of different depth"
                    )
            return [_Slice(sources, base, None, length, top_base)]
        slices = []
        for i, s in enumerate(r.slices or []):
            slices.append(self._normalize_slice(i, s, base))
        return slices

    def _normalize_slice(self, i: int, s: OutputSlice, top_base: int | None) -> _Slice:
        base = self.model_index(s.base_model, f"slices[{i}].base_model") if s.base_model else top_base
        align_base = base
        if self.method.base in ("ignored", "input"):
            base = None
        sources = []
        for j, src in enumerate(s.sources):
            where = f"slices[{i}].sources[{j}]"
            model = self.model_index(src.model, f"{where}.model")
            self._check_range(where, src, model)
            sources.append(_Source(where, model, src.layer_range[0], src.parameters))
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        return _Slice(sources, base, s.parameters, length, align_base)

    def _check_range(self, where: str, src: SliceSource, model: int) -> None:
        n = self.models[model].num_layers
        if src.layer_range[1] > n:
            raise EvomergeError(
                f"{where}.layer_range: {shown(list(src.layer_range))} reaches past the last layer of "
                f"{src.model!r}, which has {n} layers (valid: 0 <= start < end <= {n})"
            )

    # slices -> jobs -------------------------------------------------------------------------------

    def jobs(self, slices: list[_Slice]) -> list[TensorJob]:
        self._slice_index = {id(s): i for i, s in enumerate(slices)}
        out: list[TensorJob] = []
        first, last = slices[0], slices[-1]
        out += self._edge_jobs(first, "pre")
        layer = 0
        for s in slices:
            for offset in range(s.length):
                t = offset / (s.length - 1) if s.length > 1 else 1.0
                out += self._layer_jobs(s, offset, layer, t)
                layer += 1
        out += self._edge_jobs(last, "post")
        return out

    def _reference(self, s: _Slice) -> int:
        return s.base if s.base is not None else s.sources[0].model

    def _edge_jobs(self, s: _Slice, position: str) -> list[TensorJob]:
        """Embeddings (pre) or final norm / lm_head (post): every name any source has, at t = 0."""
        names: list[str] = []
        for model in [self._reference(s)] + [src.model for src in s.sources]:
            info = self.models[model]
            for name in info.shapes:
                if info.arch.classify(name)[0] == position and name not in names:
                    names.append(name)
        jobs = []
        for name in names:
            refs = [self._edge_ref(src.model, name, src.path) for src in s.sources]
            if all(ref is None for ref in refs):
                continue  # an lm_head tied to the embeddings in every model stays tied
            jobs.append(self._job(name, s, refs, t=0.0, layer=None))
        return jobs

    def _edge_ref(self, model: int, name: str, where: str) -> TensorRef | None:
        info = self.models[model]
        if name in info.shapes:
            return TensorRef(model, name)
        if name == info.arch.lm_head:
            if info.config.get("tie_word_embeddings", info.arch.family == "gpt2") is False:
                raise EvomergeError(
                    f"{where}: {info.reference!r} has no {name} and does not tie it to the "
                    "embeddings (tie_word_embeddings: false)"
                )
            tied = next((n for n in info.arch.embedding if n in info.shapes), None)
            return None if tied is None else TensorRef(model, tied)
        raise EvomergeError(f"{where}: {info.reference!r} has no tensor {name!r}")

    def _layer_jobs(self, s: _Slice, offset: int, out_layer: int, t: float) -> list[TensorJob]:
        reference = self._reference(s)
        ref_source = next((src for src in s.sources if src.model == reference), s.sources[0])
        ref_info = self.models[ref_source.model]
        ref_layer = ref_source.layer_start + offset
        suffixes = list(ref_info.layers.get(ref_layer, {}))
        if not suffixes:
            raise EvomergeError(f"{ref_source.path}: {ref_info.reference!r} has no tensors for layer {ref_layer}")
        self.layer_sources.append((ref_source.model, ref_layer))
        jobs = []
        for suffix in suffixes:
            refs: list[TensorRef | None] = []
            for src in s.sources:
                info = self.models[src.model]
                name = info.layers.get(src.layer_start + offset, {}).get(suffix)
                if name is None:
                    raise EvomergeError(
                        f"{src.path}: {info.reference!r} has no tensor for layer {src.layer_start + offset} {suffix!r}"
                    )
                refs.append(TensorRef(src.model, name))
            jobs.append(self._job(f"{ref_info.layer_prefix}{out_layer}.{suffix}", s, refs, t=t, layer=out_layer))
        return jobs

    def _job(self, name: str, s: _Slice, refs: list[TensorRef | None], *, t: float, layer: int | None) -> TensorJob:
        """`refs` is aligned with `s.sources`; the first source that is the base model is the base."""
        base_ref: TensorRef | None = None
        inputs, input_params, origin = [], [], []
        for k, (src, ref) in enumerate(zip(s.sources, refs, strict=False)):
            if s.base is not None and src.model == s.base and base_ref is None:
                base_ref = ref
                if ref is None:
                    raise EvomergeError(
                        f"{src.path}: the base {self.models[src.model].reference!r} has no tensor {name!r}"
                    )
                continue
            if ref is None:
                raise EvomergeError(f"{src.path}: {self.models[src.model].reference!r} has no tensor {name!r}")
            inputs.append(ref)
            input_params.append(self._model_params(src, s, ref.name, t))
            origin.append(k)
        self.origins.append(_JobOrigin(self._slice_index[id(s)], tuple(origin), t))
        group = self._vocabulary_group(name, s, refs) if layer is None else None
        if group is not None:
            base_ref = group.ref(base_ref) if base_ref is not None else None
            inputs = [group.ref(ref) for ref in inputs]
            first_ref = base_ref or inputs[0]
            shape = (group.vocabulary.size, *self.models[first_ref.model].shapes[first_ref.name][1:])
        else:
            shape = self._common_shape(name, base_ref, inputs, s)
        params = self._global_params(s, name, t)
        self._check_resolved(name, input_params, params)
        first = base_ref or inputs[0]
        out_dtype = self.out_dtype or self.models[first.model].dtypes[first.name]
        return TensorJob(
            name=name,
            shape=shape,
            out_dtype=out_dtype,
            base=base_ref,
            inputs=tuple(inputs),
            input_params=tuple(input_params),
            params=params,
            layer=layer,
        )

    def _vocabulary_group(self, name: str, s: _Slice, refs: list[TensorRef | None]) -> VocabularyGroup | None:
        """For an embedding / lm_head job of a recipe that merges vocabularies: how its inputs are
        re-indexed to the output vocabulary (None: nothing to re-index)."""
        if self.vocabulary is None or not self.models[0].arch.is_vocabulary(name):
            return None
        members: dict[int, TensorRef] = {}
        for ref in refs:
            if ref is not None:
                members.setdefault(ref.model, ref)
        infos = [self.models[m] for m in members]
        return vocabulary_group(
            self.vocabulary,
            name,
            list(members.values()),
            [info.path for info in infos],
            [info.reference for info in infos],
            self.models[s.align_base].path if s.align_base is not None else None,
            [self.models[r.model].shapes[r.name] for r in members.values()],
            self.input_dtype,
        )

    def _common_shape(self, name: str, base: TensorRef | None, inputs: list[TensorRef], s: _Slice) -> tuple[int, ...]:
        refs = ([base] if base else []) + inputs
        shapes = [self.models[r.model].shapes[r.name] for r in refs]
        for ref, shape in zip(refs, shapes, strict=False):
            if shape != shapes[0]:
                info, first = self.models[ref.model], self.models[refs[0].model]
                rows_only = len(shape) == 2 and len(shapes[0]) == 2 and shape[1:] == shapes[0][1:]
                what = (
                    "vocabulary sizes differ; add `tokenizer: {source: union}` (or `tokenizer_source: base`) "
                    "to align their rows by token"
                    if info.arch.is_vocabulary(ref.name) and rows_only
                    else "the models have different widths (hidden or intermediate sizes), so they are not "
                    "fine-tunes of one base and cannot be merged tensor by tensor"
                    if len(shape) == len(shapes[0])
                    else "shapes must match"
                )
                raise EvomergeError(
                    f"{name}: {info.reference!r} has shape {list(shape)} but "
                    f"{first.reference!r} has {list(shapes[0])}; {what}"
                )
        return shapes[0]

    # parameters ------------------------------------------------------------------------------------

    def _model_params(self, src: _Source, s: _Slice, tensor_name: str, t: float) -> dict[str, Any]:
        return _resolve_specs(
            self.method.model_params,
            (src.parameters, s.parameters, self.recipe.parameters),
            tensor_name,
            t,
            lambda name: (
                f"{src.path}.parameters.{name}: no value applies to tensor {tensor_name!r} "
                "(add a fallback entry without filter)"
            ),
        )

    def _global_params(self, s: _Slice, name: str, t: float) -> dict[str, Any]:
        return _resolve_specs(
            self.method.global_params,
            (s.parameters, self.recipe.parameters),
            name,
            t,
            lambda param: f"parameters.{param}: required by {self.method.name} but no value applies to tensor {name!r}",
        )

    def _check_resolved(self, name: str, input_params: list[dict[str, Any]], params: dict[str, Any]) -> None:
        normalize = {"linear": "normalize", "multislerp": "normalize_weights"}.get(self.method.name)
        if normalize and params.get(normalize, True):
            total = sum(float(p["weight"]) for p in input_params)
            if abs(total) < 1e-8:
                raise EvomergeError(
                    f"parameters.weight: the weights for {name!r} sum to 0, so normalize "
                    f"would divide by zero; change the weights or set {normalize}: false"
                )


def _resolve_specs(
    specs: Sequence[Any], scopes: Sequence[Parameters | None], tensor_name: str, t: float, missing: Callable[[str], str]
) -> dict[str, Any]:
    """Each declared parameter's value for one tensor: the first scope that sets it, else its default;
    a required parameter that no scope sets is an error (`missing(name)` says which field)."""
    values = {}
    for spec in specs:
        value = _resolve(spec.name, scopes, tensor_name, t)
        if value is None:
            if spec.required:
                raise EvomergeError(missing(spec.name))
            value = spec.default
        values[spec.name] = spec.coerce(value) if value is not None else None
    return values


def _resolve(name: str, scopes: Sequence[Parameters | None], tensor_name: str, t: float) -> Any:
    """Highest-precedence scope that yields a value for this tensor (mergekit's order)."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None


__all__ = ["MergePlan", "ModelCatalog", "ModelInfo", "PlanCache", "TensorJob", "TensorRef", "plan_merge"]
