"""Layer-stacking (DFS) candidates built from resident layers, with no weight copies.

A DFS genome decodes to a `passthrough` `slices:` recipe in which a transition scale is folded
into the output projections of the layers after it (`scale: 1/c_t` on tensors that write into the
residual stream; evomerge.search.space.dfs). In memory we undo the fold: the candidate is a model whose
every parameter *is* a resident source tensor (the plan says which), whose layer `t` has layer
index `t` (so the KV cache has one slot per path position, even when a layer repeats), and whose
layer `t` multiplies its input hidden state by `s_t = c_t / c_{t-1}`.

That equals the exported model up to the norm epsilon: RMSNorm(c * h) = RMSNorm(h) exactly only
when eps = 0. A recipe that is not of this form (scales on other tensors, a dtype change, an
architecture without `residual_outputs`) returns None here and is materialised by copying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from evomerge.candidates.resident import ResidentModel
from evomerge.merge.jobs import MergePlan


def layer_input_scales(plan: MergePlan, residents: Sequence[ResidentModel]) -> list[float] | None:
    """The scale on the hidden state entering each output layer, if `plan` is a folded layer path
    that can run on the resident tensors as they are; otherwise None."""
    if plan.method.name != "passthrough" or not plan.jobs:
        return None
    if any(ref.vocabulary is not None for job in plan.jobs for ref in job.inputs):
        return None  # re-indexed vocabulary rows are not resident tensors: write the candidate in place
    arch = plan.models[0].arch
    if not arch.residual_outputs or plan.models[plan.donor].layer_prefix != arch.layer_prefixes[0]:
        return None  # no scale fold, or a headless checkpoint (GPT-2 `h.N`) unlike the module's names
    out_scale: dict[int, float] = {}
    for job in plan.jobs:
        ref = job.inputs[0]
        stored = residents[ref.model].tensors[ref.name].dtype
        if job.out_dtype != stored or plan.input_dtype not in (None, stored):
            return None  # the exported tensor is a cast of the resident one, not the same values
        raw = job.input_params[0].get("scale")
        value = 1.0 if raw is None else float(raw)
        if job.layer is None:
            if value != 1.0:
                return None
            continue
        suffix = arch.classify(job.name)[2]
        if any(p in suffix for p in arch.residual_outputs):
            if value <= 0 or out_scale.setdefault(job.layer, value) != value:
                return None
        elif value != 1.0:
            return None
    scales, previous = [], 1.0
    for layer in range(len(plan.layer_sources)):
        current = out_scale.get(layer, 1.0)  # 1 / c_t
        scales.append(previous / current)  # s_t = c_t / c_{t-1}
        previous = current
    return scales


def build_stacked(
    plan: MergePlan, residents: Sequence[ResidentModel], scales: Sequence[float], generation_config: Any = None
) -> torch.nn.Module:
    """The candidate: a model skeleton (meta device, no memory) whose parameters are then bound
    to the resident tensors the plan names, plus an input-scale hook on every scaled layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**plan.out_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.jobs[0].out_dtype)
    model.eval().requires_grad_(False)
    bound: set[str] = set()
    arch = plan.models[0].arch
    for job in plan.jobs:
        ref = job.inputs[0]
        _bind_parameter(model, arch.module_name(job.name), residents[ref.model].tensors[ref.name])
        bound.add(arch.module_name(job.name))
    _tie_unwritten_head(model, bound)
    _bind_buffers(model, plan, residents)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"stacked model: tensors not bound to a source: {left[:3]}")
    prefix = plan.models[plan.donor].layer_prefix.rstrip(".")
    layers = model.get_submodule(prefix)
    for index, scale in enumerate(scales):
        if scale != 1.0:
            layers[index].register_forward_pre_hook(_scale_input(scale), with_kwargs=True)
    if generation_config is not None:
        model.generation_config = generation_config
    return model


def _bind_parameter(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_path)
    if attr not in owner._parameters:
        raise RuntimeError(f"stacked model: {name} is not a parameter of the target architecture")
    current = owner._parameters[attr]
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise RuntimeError(f"stacked model: {name} has shape {list(tensor.shape)}, expected {list(current.shape)}")
    owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)  # shares storage


def _tie_unwritten_head(model: torch.nn.Module, bound: set[str]) -> None:
    """A tied output embedding that the plan did not write is the (bound) input embedding."""
    head = model.get_output_embeddings()
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    head_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    if head_name not in bound:
        head._parameters["weight"] = model.get_input_embeddings().weight


def _bind_buffers(model: torch.nn.Module, plan: MergePlan, residents: Sequence[ResidentModel]) -> None:
    """Non-persistent buffers (e.g. rotary frequencies) come from the source module of the same
    layer, or from the donor model outside the layers."""
    prefix = plan.models[plan.donor].layer_prefix
    donor = residents[plan.donor].module
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        source_module, source_name = donor, name
        if name.startswith(prefix):
            index, _, rest = name[len(prefix) :].partition(".")
            model_index, layer = plan.layer_sources[int(index)]
            source_module, source_name = residents[model_index].module, f"{prefix}{layer}.{rest}"
        module_path, _, attr = name.rpartition(".")
        model.get_submodule(module_path)._buffers[attr] = source_module.get_buffer(source_name)


def _scale_input(scale: float) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook
