"""Function-preserving permutations of a decoder and Git Re-Basin weight matching.

Permutation groups (methods.md §15):
* `mlp.L`  — MLP hidden units of layer L, freely (Llama gate/up rows + down columns; GPT-2 c_fc
  columns + bias, mlp c_proj rows);
* `heads.L` — attention heads of layer L as whole blocks; under GQA the unit is a KV group (its
  k/v head and the q heads that read it move together). Dimensions inside a head stay fixed
  (RoPE pairs them), and q heads are not reordered inside their group;
* `residual` — one permutation of the residual stream shared by the whole network (embeddings,
  every norm, every layer's input columns and output rows, the final norm and lm_head), because
  every block reads and writes the same stream. `residual: false` leaves it fixed.

An axis of a tensor is permuted in `sections` equal parts (GPT-2's c_attn packs q|k|v), each made
of `n` blocks of `block` consecutive entries; the group's permutation reorders the blocks.
Weight matching maximises sum_w <A_w, pi(B_w)> by coordinate descent: one linear assignment
(scipy) per group with all other groups fixed, sweeps until a sweep gains nothing.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class AxisPerm:
    group: str
    axis: int
    block: int = 1
    sections: int = 1


@dataclass
class PermutationSpec:
    """Which axes of which tensors each group permutes, and each group's size."""

    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, list[AxisPerm]] = field(default_factory=dict)  # tensor name -> permuted axes

    def add(
        self,
        name: str,
        shapes: Mapping[str, tuple[int, ...]],
        group: str,
        axis: int,
        *,
        block: int = 1,
        sections: int = 1,
    ) -> None:
        if name not in shapes:
            return
        n = shapes[name][axis] // (block * sections)
        if self.sizes.setdefault(group, n) != n:
            raise EvomergeError(f"{name}: axis {axis} does not match the size of permutation group {group}")
        self.axes.setdefault(name, []).append(AxisPerm(group, axis, block, sections))

    def tensors_of(self, group: str) -> list[tuple[str, AxisPerm]]:
        return [(name, ap) for name, aps in self.axes.items() for ap in aps if ap.group == group]


def expand(perm: torch.Tensor, ap: AxisPerm) -> torch.Tensor:
    """The full index along the axis for a block permutation `perm`."""
    n = perm.numel()
    blocks = (perm[:, None] * ap.block + torch.arange(ap.block)[None, :]).reshape(-1)
    return torch.cat([s * n * ap.block + blocks for s in range(ap.sections)])


def apply_permutation(
    name: str, tensor: torch.Tensor, spec: PermutationSpec, perms: Mapping[str, torch.Tensor], skip: str | None = None
) -> torch.Tensor:
    """`tensor` (of model B) re-indexed into the matched basis; `skip` leaves one group out."""
    for ap in spec.axes.get(name, ()):
        if ap.group == skip or ap.group not in perms:
            continue
        tensor = tensor.index_select(ap.axis, expand(perms[ap.group], ap))
    return tensor


def llama_spec(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, residual: bool) -> PermutationSpec:
    spec = PermutationSpec()
    n_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    group = heads // kv
    res = "residual"
    if residual:
        spec.add("model.embed_tokens.weight", shapes, res, 1)
        spec.add("lm_head.weight", shapes, res, 1)
        spec.add("model.norm.weight", shapes, res, 0)
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        h, m = f"heads.{layer}", f"mlp.{layer}"
        for proj, block in (("q_proj", head_dim * group), ("k_proj", head_dim), ("v_proj", head_dim)):
            spec.add(f"{p}self_attn.{proj}.weight", shapes, h, 0, block=block)
            spec.add(f"{p}self_attn.{proj}.bias", shapes, h, 0, block=block)
            if residual:
                spec.add(f"{p}self_attn.{proj}.weight", shapes, res, 1)
        spec.add(f"{p}self_attn.o_proj.weight", shapes, h, 1, block=head_dim * group)
        for proj in ("gate_proj", "up_proj"):
            spec.add(f"{p}mlp.{proj}.weight", shapes, m, 0)
            spec.add(f"{p}mlp.{proj}.bias", shapes, m, 0)
            if residual:
                spec.add(f"{p}mlp.{proj}.weight", shapes, res, 1)
        spec.add(f"{p}mlp.down_proj.weight", shapes, m, 1)
        if residual:
            for name in (
                "self_attn.o_proj.weight",
                "self_attn.o_proj.bias",
                "mlp.down_proj.weight",
                "mlp.down_proj.bias",
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
            ):
                spec.add(p + name, shapes, res, 0)
    return spec


def gpt2_spec(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, residual: bool, prefix: str
) -> PermutationSpec:
    """GPT-2 `Conv1D` weights are [in, out]: the axes are swapped relative to Llama."""
    spec = PermutationSpec()
    n_layers, heads, hidden = int(config["n_layer"]), int(config["n_head"]), int(config["n_embd"])
    head_dim = hidden // heads
    res = "residual"
    if residual:
        for name in ("wte.weight", "wpe.weight"):
            spec.add(prefix + name, shapes, res, 1)
        spec.add("lm_head.weight", shapes, res, 1)
        spec.add(prefix + "ln_f.weight", shapes, res, 0)
        spec.add(prefix + "ln_f.bias", shapes, res, 0)
    for layer in range(n_layers):
        p = f"{prefix}h.{layer}."
        h, m = f"heads.{layer}", f"mlp.{layer}"
        spec.add(p + "attn.c_attn.weight", shapes, h, 1, block=head_dim, sections=3)
        spec.add(p + "attn.c_attn.bias", shapes, h, 0, block=head_dim, sections=3)
        spec.add(p + "attn.c_proj.weight", shapes, h, 0, block=head_dim)
        spec.add(p + "mlp.c_fc.weight", shapes, m, 1)
        spec.add(p + "mlp.c_fc.bias", shapes, m, 0)
        spec.add(p + "mlp.c_proj.weight", shapes, m, 0)
        if residual:
            for name in ("attn.c_attn.weight", "mlp.c_fc.weight"):
                spec.add(p + name, shapes, res, 0)
            for name in ("attn.c_proj.weight", "mlp.c_proj.weight"):
                spec.add(p + name, shapes, res, 1)
            for name in ("attn.c_proj.bias", "mlp.c_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
                spec.add(p + name, shapes, res, 0)
    return spec


def permutation_spec(
    family: str, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, residual: bool
) -> PermutationSpec:
    if family == "llama":
        return llama_spec(config, shapes, residual=residual)
    if family == "gpt2":
        prefix = "transformer." if any(n.startswith("transformer.") for n in shapes) else ""
        return gpt2_spec(config, shapes, residual=residual, prefix=prefix)
    raise EvomergeError(f"rebasin: no permutation spec for the {family} family")


def _unfold(tensor: torch.Tensor, ap: AxisPerm) -> torch.Tensor:
    """[n, everything else] with the n blocks of the permuted axis as rows."""
    moved = tensor.double().movedim(ap.axis, 0)
    n = moved.shape[0] // (ap.block * ap.sections)
    rest = moved.reshape(ap.sections, n, ap.block, -1)
    return rest.permute(1, 0, 2, 3).reshape(n, -1)


def _cost(
    group: str,
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """C[i, j] = sum of inner products of A's block i with B's block j (other groups applied to B)."""
    n = spec.sizes[group]
    cost = torch.zeros(n, n, dtype=torch.float64)
    for name, ap in spec.tensors_of(group):
        b_other = apply_permutation(name, b[name], spec, perms, skip=group)
        cost += _unfold(a[name], ap) @ _unfold(b_other, ap).T
    return cost


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations of B's groups that maximise sum_w <A_w, pi(B_w)>; returns (perms, sweeps run)."""
    from scipy.optimize import linear_sum_assignment

    perms = {g: torch.arange(n) for g, n in spec.sizes.items()}
    order = sorted(spec.sizes)
    rng = random.Random(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007
        rng.shuffle(order)
        improved = False
        for group in order:
            cost = _cost(group, spec, a, b, perms)
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_value = float(cost[torch.arange(len(rows)), perms[group]].sum())
            new_value = float(cost[torch.as_tensor(rows), new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[group] = new
                improved = True
        if not improved:
            break
    return perms, sweeps


def random_permutations(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation of every group (for symmetry tests and benchmarks)."""
    generator = torch.Generator().manual_seed(seed)
    return {group: torch.randperm(n, generator=generator) for group, n in sorted(spec.sizes.items())}


def permute_state(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict re-indexed by `perms` (a function-preserving relabelling)."""
    return {name: apply_permutation(name, tensor, spec, perms).contiguous() for name, tensor in state.items()}
