"""Model-level pre-passes of the data-aware methods, run once before any tensor is merged.

`run_plan` calls a method's `prepare(plan, source, device)`; the result's `for_job(job)` hands each
per-tensor job the slice of model-level data it needs (its inputs' Fisher / Gram, B's permutation,
a REPAIR fold), so the per-tensor functions stay pure and the streaming merge loop is unchanged.
Statistics and permutations are cached on disk keyed by model content + calibration tokens +
settings, so a search computes them once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.data_aware.cache import entry_key, model_fingerprint, statistics_cache
from evomerge.merge.data_aware.calibration import CalibrationConfig, TokenBatch, calibration_batch, calibration_of
from evomerge.merge.data_aware.permutation import PermutationSpec, apply_permutation, permutation_spec, weight_matching
from evomerge.merge.data_aware.repair import Fold, gpt2_points, llama_points, module_name, repair_folds
from evomerge.merge.data_aware.statistics import InputStatistics, collect_fisher, collect_grams, linear_modules
from evomerge.merge.jobs import MergePlan, ModelInfo, TensorJob, TensorRef

STATISTICS_VERSION = 2  # bump when the estimators change, so old cache entries are not reused


@dataclass
class JobContext:
    """What one job gets: per-input statistics, B's alignment, the REPAIR fold of its output."""

    statistics: list[InputStatistics] = field(default_factory=list)
    align_input: Any = None  # (input index, tensor) -> tensor in the reference basis
    fold: Fold | None = None

    def align(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.align_input is None else self.align_input(i, tensor)


# -- shared helpers ---------------------------------------------------------------------------------


def _search_dirs(plan: MergePlan) -> list[Path]:
    dirs = [Path.cwd()]
    return dirs + [m.path.parent for m in plan.models]


def _load_module(info: ModelInfo, device: torch.device | str) -> torch.nn.Module:
    from evomerge.io.model_loading import load_model_and_tokenizer

    model, _tokenizer = load_model_and_tokenizer(info.path, device=str(device))
    return model


def _tokenizer(plan: MergePlan) -> Any:
    from transformers import AutoTokenizer

    refs = [ref for job in plan.jobs for ref in (job.base, *job.inputs) if ref is not None]
    if any(ref.vocabulary is not None for ref in refs):
        raise EvomergeError(
            "tokenizer: data-aware methods feed the same token ids to every source model, but these models' "
            "vocabularies differ (their rows were re-indexed); merge them with a method without calibration"
        )
    return AutoTokenizer.from_pretrained(plan.models[plan.tokenizer_model].path, local_files_only=True)


def _tokens(plan: MergePlan, config: CalibrationConfig, reference: str, tokenizer: Any) -> TokenBatch:
    recipe_dirs = _search_dirs(plan)
    return calibration_batch(config, reference, tokenizer, recipe_dirs)


def _input_models(plan: MergePlan) -> list[int]:
    models: list[int] = []
    for job in plan.jobs:
        for ref in job.inputs:
            if ref.model not in models:
                models.append(ref.model)
    return models


# -- fisher / regmean ---------------------------------------------------------------------------------


@dataclass
class ModelStatistics:
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher_norm: float = 1.0
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    input_axes: dict[str, int] = field(default_factory=dict)


@dataclass
class StatisticsPrepared:
    """Per-model statistics; `for_job` picks each input tensor's own."""

    models: dict[int, ModelStatistics]

    def for_job(self, job: TensorJob) -> JobContext:
        return JobContext(statistics=[self._input(ref) for ref in job.inputs])

    def _input(self, ref: TensorRef) -> InputStatistics:
        s = self.models[ref.model]
        return InputStatistics(
            fisher=s.fisher.get(ref.name),
            fisher_norm=s.fisher_norm,
            gram=s.grams.get(ref.name),
            rows=s.rows.get(ref.name, 0),
            input_axis=s.input_axes.get(ref.name, 1),
        )


def _model_statistics(
    plan: MergePlan, model: int, kind: str, config: CalibrationConfig, tokenizer: Any, device: torch.device | str
) -> ModelStatistics:
    info = plan.models[model]
    tokens = _tokens(plan, config, info.reference, tokenizer)
    settings = {"kind": kind, "fisher": config.fisher, "seed": config.seed, "version": STATISTICS_VERSION}
    key = entry_key(model=model_fingerprint(info.path), data=tokens.fingerprint, **settings)
    cache = statistics_cache(config.cache_dir)
    tensors = cache.get(kind, key)
    if tensors is None:
        tensors = _compute_statistics(info, kind, tokens, config, device)
        cache.put(kind, key, tensors)
    stats = ModelStatistics()
    for name, value in tensors.items():
        what, _, tensor_name = name.partition("::")
        if what == "fisher":
            stats.fisher[tensor_name] = value.float()
        elif what == "gram":
            stats.grams[tensor_name] = value
        elif what == "rows":
            stats.rows[tensor_name] = int(value)
        elif what == "axis":
            stats.input_axes[tensor_name] = int(value)
    if stats.fisher:
        stats.fisher_norm = float(torch.sqrt(sum(f.double().square().sum() for f in stats.fisher.values())))
    return stats


def _compute_statistics(
    info: ModelInfo, kind: str, tokens: TokenBatch, config: CalibrationConfig, device: torch.device | str
) -> dict[str, torch.Tensor]:
    module = _load_module(info, device)
    tokens = TokenBatch(*(t.to(device) for t in (tokens.input_ids, tokens.attention_mask, tokens.loss_mask)))
    out: dict[str, torch.Tensor] = {}
    if kind == "fisher":
        for name, value in collect_fisher(module, tokens, sampled=config.fisher == "sampled", seed=config.seed).items():
            name = checkpoint_name(name, info.shapes)
            if name in info.shapes:  # a tied lm_head is stored (and merged) as the embedding
                out[f"fisher::{name}"] = value.cpu()
    else:
        stored = {name for name, _m, _a in linear_modules(module) if checkpoint_name(name, info.shapes) in info.shapes}
        axes = {name: axis for name, _m, axis in linear_modules(module)}
        for module_weight, (gram, rows) in collect_grams(module, tokens, config.batch_size, stored).items():
            name = checkpoint_name(module_weight, info.shapes)
            out[f"gram::{name}"] = gram.cpu()
            out[f"rows::{name}"] = torch.tensor(rows)
            out[f"axis::{name}"] = torch.tensor(axes[module_weight])
    return out


def checkpoint_name(module_name: str, shapes: Mapping[str, Any]) -> str:
    """A module parameter's checkpoint name (headless GPT-2 checkpoints drop `transformer.`)."""
    if (
        module_name not in shapes
        and module_name.startswith("transformer.")
        and module_name.removeprefix("transformer.") in shapes
    ):
        return module_name.removeprefix("transformer.")
    return module_name


def prepare_statistics(kind: str):
    def prepare(plan: MergePlan, source: Any, device: torch.device | str) -> StatisticsPrepared:
        config = calibration_of(plan.recipe)
        assert config is not None, "checked when the recipe was validated"
        tokenizer = _tokenizer(plan)
        return StatisticsPrepared(
            {m: _model_statistics(plan, m, kind, config, tokenizer, device) for m in _input_models(plan)}
        )

    return prepare


# -- rebasin / repair ---------------------------------------------------------------------------------------


def _pair(plan: MergePlan) -> tuple[int, int]:
    """(reference model A = the base, model B = the single other input)."""
    job = next(j for j in plan.jobs if j.base is not None)
    return job.base.model, job.inputs[0].model  # type: ignore[union-attr]


def _tensors(source: Any, model: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {name: source.get(TensorRef(model, name)).float().cpu() for name in names}


@dataclass
class Alignment:
    spec: PermutationSpec
    perms: dict[str, torch.Tensor]
    sweeps: int


def align_models(plan: MergePlan, source: Any, *, residual: bool, max_sweeps: int) -> Alignment:
    """Weight matching of B onto A (cached on disk by both models' content and the settings)."""
    a, b = _pair(plan)
    info_a, info_b = plan.models[a], plan.models[b]
    if info_b.arch.symmetry is None:
        raise EvomergeError(f"rebasin: no permutation symmetry for the {info_b.arch.family} family (its file)")
    spec = permutation_spec(info_b.arch.symmetry, info_b.config, info_b.shapes, residual=residual)
    cache = statistics_cache(None)
    key = entry_key(
        a=model_fingerprint(info_a.path),
        b=model_fingerprint(info_b.path),
        residual=residual,
        max_sweeps=max_sweeps,
        version=STATISTICS_VERSION,
    )
    hit = cache.get("rebasin", key)
    if hit is not None:
        perms = {group: perm for group, perm in hit.items() if group != "__sweeps__"}
        return Alignment(spec, perms, int(hit["__sweeps__"]))
    names = list(spec.axes)
    perms, sweeps = weight_matching(spec, _tensors(source, a, names), _tensors(source, b, names), max_sweeps=max_sweeps)
    cache.put("rebasin", key, {**perms, "__sweeps__": torch.tensor(sweeps)})
    return Alignment(spec, perms, sweeps)


def _align_fn(alignment: Alignment | None, job: TensorJob):
    if alignment is None:
        return None
    names = [ref.name for ref in job.inputs]
    return lambda i, tensor: apply_permutation(names[i], tensor, alignment.spec, alignment.perms)


@dataclass
class AlignedPrepared:
    alignment: Alignment | None
    folds: dict[str, Fold] = field(default_factory=dict)

    def for_job(self, job: TensorJob) -> JobContext:
        return JobContext(align_input=_align_fn(self.alignment, job), fold=self.folds.get(job.name))


def _settings(plan: MergePlan) -> Mapping[str, Any]:
    job = next(j for j in plan.jobs if j.base is not None)
    return job.params


def prepare_rebasin(plan: MergePlan, source: Any, device: torch.device | str) -> AlignedPrepared:
    params = _settings(plan)
    return AlignedPrepared(
        align_models(
            plan, source, residual=bool(params.get("residual", True)), max_sweeps=int(params.get("max_sweeps", 100))
        )
    )


def interpolate(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b, exact at both ends (t = 0 gives a, t = 1 gives b bit for bit)."""
    return a * (1.0 - t) + b * t


def prepare_repair(plan: MergePlan, source: Any, device: torch.device | str) -> AlignedPrepared:
    params = _settings(plan)
    alignment = None
    if params.get("permute", True):
        alignment = align_models(
            plan, source, residual=bool(params.get("residual", True)), max_sweeps=int(params.get("max_sweeps", 100))
        )
    config = calibration_of(plan.recipe)
    assert config is not None
    a, b = _pair(plan)
    info_a = plan.models[a]
    tokens = _tokens(plan, config, info_a.reference, _tokenizer(plan))
    endpoint_a = _load_module(info_a, device)
    endpoint_b = _load_module(plan.models[b], device)
    merged = _load_module(info_a, device)
    t_by_name: dict[str, float] = {}
    state_b, state_m = {}, {}
    for job in plan.jobs:
        assert job.base is not None
        a_t, b_t = source.get(job.base).float(), source.get(job.inputs[0]).float()
        if alignment is not None:
            b_t = apply_permutation(job.inputs[0].name, b_t, alignment.spec, alignment.perms)
        t = float(job.input_params[0]["t"])
        t_by_name[job.name] = t
        state_b[job.name] = b_t
        state_m[job.name] = interpolate(a_t, b_t, t)
    _assign(endpoint_b, state_b, device)
    _assign(merged, state_m, device)
    tokens = TokenBatch(*(x.to(device) for x in (tokens.input_ids, tokens.attention_mask, tokens.loss_mask)))
    if info_a.arch.symmetry == "llama":
        points = llama_points(info_a.config, info_a.num_layers, info_a.shapes)
    elif info_a.arch.symmetry != "gpt2":
        raise EvomergeError(f"repair: no repair points for the {info_a.arch.family} family (no symmetry in its file)")
    else:
        prefix = "transformer." if any(n.startswith("transformer.") for n in info_a.shapes) else ""
        points = gpt2_points(info_a.config, info_a.num_layers, prefix)
    folds = repair_folds(merged, endpoint_a, endpoint_b, tokens, points, t_by_name.__getitem__, config.batch_size)
    return AlignedPrepared(
        alignment,
        {name: Fold(f.axis, f.scale.cpu(), None if f.shift is None else f.shift.cpu()) for name, f in folds.items()},
    )


def _assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str) -> None:
    params = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in state.items():
            params[module_name(name, params)].copy_(tensor.to(device))
