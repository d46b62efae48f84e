"""Function-preserving permutations of a decoder and Git Re-Basin weight matching.

Permutation groups (methods.md §15):
* `mlp.L`  — MLP hidden units of layer L, freely (Llama gate/up rows + down columns; GPT-2 c_fc
  columns + bias, mlp c_proj rows);
* `heads.L` — KV heads of layer L (k/v rows) as whole blocks; `qheads.L` — the query heads
  (q rows, o_proj columns), *nested* in `heads.L`: the q heads that read KV head j must stay in
  the group of the KV head j moves to, but may be reordered freely inside it (GQA's full
  symmetry; without GQA each group holds one q head). Dimensions inside a head stay fixed (RoPE
  pairs them);
* `residual` — one permutation of the residual stream shared by the whole network (embeddings,
  every norm, every layer's input columns and output rows, the final norm and lm_head), because
  every block reads and writes the same stream. `residual: false` leaves it fixed.

An axis of a tensor is permuted in `sections` equal parts (GPT-2's c_attn packs q|k|v), each made
of `n` blocks of `block` consecutive entries; the group's permutation reorders the blocks.
Weight matching maximises sum_w <A_w, pi(B_w)> by coordinate descent: one linear assignment
(scipy) per group with all other groups fixed, sweeps until a sweep gains nothing. A group with
nested children is solved jointly with them: the cost of pairing unit i with unit j adds the best
assignment of i's members to j's members (one small assignment per pair).
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
    start: int = 0  # the permuted entries are axis[start : start + span] (a fused projection's part)
    span: int | None = None  # None: to the end of the axis


@dataclass
class PermutationSpec:
    """Which axes of which tensors each group permutes, and each group's size."""

    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, list[AxisPerm]] = field(default_factory=dict)  # tensor name -> permuted axes
    # child group -> (parent group, members per parent unit): child entries k*m .. k*m+m-1 belong
    # to parent unit k, and a valid child permutation maps them into the parent image of k.
    nested: dict[str, tuple[str, int]] = field(default_factory=dict)

    def add(
        self,
        name: str,
        shapes: Mapping[str, tuple[int, ...]],
        group: str,
        axis: int,
        *,
        block: int = 1,
        sections: int = 1,
        start: int = 0,
        span: int | None = None,
    ) -> None:
        if name not in shapes:
            return
        length = shapes[name][axis] - start if span is None else span
        n = length // (block * sections)
        if n * block * sections != length or self.sizes.setdefault(group, n) != n:
            raise EvomergeError(f"{name}: axis {axis} does not match the size of permutation group {group}")
        self.axes.setdefault(name, []).append(AxisPerm(group, axis, block, sections, start, length))

    def nest(self, child: str, parent: str, members: int) -> None:
        if child in self.sizes and parent in self.sizes:
            if self.sizes[child] != self.sizes[parent] * members:
                raise EvomergeError(f"permutation group {child} does not split into {members} per {parent} unit")
            self.nested[child] = (parent, members)

    def children(self, parent: str) -> list[tuple[str, int]]:
        return [(child, m) for child, (p, m) in sorted(self.nested.items()) if p == parent]

    def tensors_of(self, group: str) -> list[tuple[str, AxisPerm]]:
        return [(name, ap) for name, aps in self.axes.items() for ap in aps if ap.group == group]


def expand(perm: torch.Tensor, ap: AxisPerm, size: int) -> torch.Tensor:
    """The full index along an axis of `size` entries for a block permutation `perm`."""
    n = perm.numel()
    blocks = (perm[:, None] * ap.block + torch.arange(ap.block)[None, :]).reshape(-1)
    index = torch.arange(size)
    permuted = torch.cat([s * n * ap.block + blocks for s in range(ap.sections)])
    index[ap.start : ap.start + permuted.numel()] = ap.start + permuted
    return index


def apply_permutation(
    name: str, tensor: torch.Tensor, spec: PermutationSpec, perms: Mapping[str, torch.Tensor], skip: str | None = None
) -> torch.Tensor:
    """`tensor` (of model B) re-indexed into the matched basis; `skip` leaves one group out."""
    for ap in spec.axes.get(name, ()):
        if ap.group == skip or ap.group not in perms:
            continue
        tensor = tensor.index_select(ap.axis, expand(perms[ap.group], ap, tensor.shape[ap.axis]))
    return tensor


def llama_spec(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, residual: bool) -> PermutationSpec:
    """Decoders named like Llama (`model.layers.N.{self_attn,mlp}.*`): Llama, Mistral, Qwen2/3, Gemma
    1-3, Phi3 (fused qkv/gate_up), OLMo2 and Cohere (q/k norms), Granite, StableLM, Starcoder2
    (biases, LayerNorms, c_fc/c_proj MLPs). Every layer tensor must be covered by a rule below,
    or the family is refused: a tensor left out would break the function."""
    spec = PermutationSpec()
    n_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    res = "residual"
    covered: set[str] = set()

    def add(name: str, group: str, axis: int, **kwargs: int) -> None:
        if name in shapes:
            covered.add(name)
            if group != res or residual:
                spec.add(name, shapes, group, axis, **kwargs)

    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        add(name, res, 1)
    for name in ("model.norm.weight", "model.norm.bias"):
        add(name, res, 0)
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        h, q, m = f"heads.{layer}", f"qheads.{layer}", f"mlp.{layer}"
        for proj, owner in (("q_proj", q), ("k_proj", h), ("v_proj", h)):
            add(f"{p}self_attn.{proj}.weight", owner, 0, block=head_dim)
            add(f"{p}self_attn.{proj}.bias", owner, 0, block=head_dim)
            add(f"{p}self_attn.{proj}.weight", res, 1)
        q_rows, kv_rows = heads * head_dim, kv * head_dim  # Phi3's qkv_proj rows: q | k | v
        add(f"{p}self_attn.qkv_proj.weight", q, 0, block=head_dim, span=q_rows)
        add(f"{p}self_attn.qkv_proj.weight", h, 0, block=head_dim, start=q_rows, span=kv_rows)
        add(f"{p}self_attn.qkv_proj.weight", h, 0, block=head_dim, start=q_rows + kv_rows, span=kv_rows)
        add(f"{p}self_attn.qkv_proj.weight", res, 1)
        for norm, owner, count in (("q_norm", q, heads), ("k_norm", h, kv)):
            name = f"{p}self_attn.{norm}.weight"
            if name in shapes and shapes[name] != (head_dim,):  # per-head weights move with their heads
                add(name, owner, 0, block=head_dim if shapes[name] == (count * head_dim,) else 1)
            covered.add(name)  # shared over heads: nothing to move
        add(f"{p}self_attn.o_proj.weight", q, 1, block=head_dim)
        add(f"{p}self_attn.o_proj.weight", res, 0)
        add(f"{p}self_attn.o_proj.bias", res, 0)
        for proj in ("gate_proj", "up_proj", "c_fc"):
            add(f"{p}mlp.{proj}.weight", m, 0)
            add(f"{p}mlp.{proj}.bias", m, 0)
            add(f"{p}mlp.{proj}.weight", res, 1)
        add(f"{p}mlp.gate_up_proj.weight", m, 0, sections=2)
        add(f"{p}mlp.gate_up_proj.weight", res, 1)
        for proj in ("down_proj", "c_proj"):
            add(f"{p}mlp.{proj}.weight", m, 1)
            add(f"{p}mlp.{proj}.weight", res, 0)
            add(f"{p}mlp.{proj}.bias", res, 0)
        for name in shapes:  # input_, post_attention_, pre_/post_feedforward_ norms: residual width
            module = name[len(p) :].rpartition(".")[0]
            if name.startswith(p) and module.endswith("layernorm") and "." not in module:
                add(name, res, 0)
        spec.nest(q, h, heads // kv)
    left = sorted(name for name in shapes if name not in covered)
    if left:
        raise EvomergeError(f"rebasin: no permutation rule for tensor {left[0]!r}; this layout is not supported")
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
    moved = moved[ap.start : ap.start + (moved.shape[0] - ap.start if ap.span is None else ap.span)]
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


def _nested_assignments(cost: torch.Tensor, parents: int, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (parent unit i of A, parent unit j of B): the best value of assigning i's members
    to j's members, and that assignment (as B member offsets)."""
    from scipy.optimize import linear_sum_assignment

    values = torch.zeros(parents, parents, dtype=torch.float64)
    choice = torch.zeros(parents, parents, members, dtype=torch.long)
    for i in range(parents):
        for j in range(parents):
            block = cost[i * members : (i + 1) * members, j * members : (j + 1) * members]
            rows, cols = linear_sum_assignment(block.numpy(), maximize=True)
            values[i, j] = float(block[torch.as_tensor(rows), torch.as_tensor(cols)].sum())
            choice[i, j] = torch.as_tensor(cols, dtype=torch.long)
    return values, choice


def nested_permutation(parent: torch.Tensor, offsets: torch.Tensor, members: int) -> torch.Tensor:
    """The child permutation that sends A's member r of unit i to B's member offsets[i, r] of unit parent[i]."""
    return (parent[:, None] * members + offsets).reshape(-1)


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
    order = sorted(g for g in spec.sizes if g not in spec.nested)  # children move with their parent
    rng = random.Random(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007
        rng.shuffle(order)
        improved = False
        for group in order:
            cost = _cost(group, spec, a, b, perms)
            old_value = float(cost[torch.arange(cost.shape[0]), perms[group]].sum())
            choices = []
            for child, members in spec.children(group):
                child_cost = _cost(child, spec, a, b, perms)
                old_value += float(child_cost[torch.arange(child_cost.shape[0]), perms[child]].sum())
                values, choice = _nested_assignments(child_cost, spec.sizes[group], members)
                cost = cost + values
                choices.append((child, members, choice))
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            new_value = float(cost[torch.as_tensor(rows), new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[group] = new
                for child, members, choice in choices:
                    perms[child] = nested_permutation(new, choice[torch.arange(new.numel()), new], members)
                improved = True
        if not improved:
            break
    return perms, sweeps


def random_permutations(spec: PermutationSpec, seed: int, *, move_all: bool = False) -> dict[str, torch.Tensor]:
    """A random valid permutation of every group (for symmetry tests and benchmarks); nested
    groups get a random order inside each parent unit. `move_all` redraws any group (or nested
    unit) left as it was, where it has more than one element."""
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        perm = torch.randperm(n, generator=generator)
        while move_all and n > 1 and torch.equal(perm, torch.arange(n)):
            perm = torch.randperm(n, generator=generator)
        return perm

    perms = {group: draw(n) for group, n in sorted(spec.sizes.items()) if group not in spec.nested}
    for child, (parent, members) in sorted(spec.nested.items()):
        offsets = torch.stack([draw(members) for _ in range(spec.sizes[parent])])
        perms[child] = nested_permutation(perms[parent], offsets, members)
    return perms


def permute_state(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict re-indexed by `perms` (a function-preserving relabelling)."""
    return {name: apply_permutation(name, tensor, spec, perms).contiguous() for name, tensor in state.items()}
