"""REPAIR for decoders: restore the activation statistics that interpolation collapses.

For every repaired unit, the goal is the interpolation of the endpoints' statistics on the
calibration data (B already permuted into A's basis), e.g. sigma* = (1 - t) sigma_A + t sigma_B,
and the merged model's unit is rescaled (and shifted, where a bias can take the shift) to reach it.
Layers are repaired in order, each measured after the earlier ones are repaired (the exact,
sequential variant). The maps are folded into weights, so the output is a plain model.

The paper repairs every pre-activation, i.e. every input of a nonlinearity. In a decoder the
attention softmax is one: its logits q.k collapse with q and k (two independently trained models
put unrelated directions in their heads), attention blurs towards uniform, and restoring only the
attention *output* and MLP units then amplifies blurred features. So q and k are repaired too.

* GPT-2 (biases everywhere): full affine repair (mean and std) of the q and k channels (c_attn
  output, q|k thirds), the MLP pre-activations (c_fc output) and the attention value channels
  (input of attn.c_proj, folded into the v third of c_attn: attention weights sum to 1, so a
  shift of v shifts the output by the same amount).
* Llama-style (no biases): only a scale can be folded, and a scale moves the mean with the std;
  so the matched statistic is the root mean square, the one moment a scale sets exactly. Units:
  q and k outputs (one scale per RoPE pair i, i + head_dim/2 of a head, because RoPE rotates the
  pair together and only a shared scale commutes with it; the pair's RMS is rotation invariant),
  attention value channels (input of o_proj, folded into its columns) and MLP hidden units
  (input of down_proj, folded into its columns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.data_aware.calibration import TokenBatch

Match = Literal["affine", "rms", "rotary_rms"]


def module_name(checkpoint_name: str, names: Mapping[str, object]) -> str:
    """The module parameter for a checkpoint tensor (headless GPT-2 files drop `transformer.`)."""
    return checkpoint_name if checkpoint_name in names else f"transformer.{checkpoint_name}"


@dataclass(frozen=True)
class Fold:
    """`tensor * scale` along `axis` (broadcast), plus `shift` for a 1-D bias."""

    axis: int
    scale: torch.Tensor
    shift: torch.Tensor | None = None

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        shape = [1] * tensor.dim()
        shape[self.axis] = -1
        out = tensor * self.scale.to(tensor.dtype).reshape(shape)
        if self.shift is not None:
            out = out + self.shift.to(tensor.dtype)
        return out

    def then(self, later: Fold) -> Fold:
        """One fold equal to applying `self`, then `later` (two points repairing the same tensor)."""
        if later.axis != self.axis:
            raise ValueError("folds of one tensor must act along the same axis")
        shift = self.shift * later.scale if self.shift is not None else None
        if later.shift is not None:
            shift = later.shift if shift is None else shift + later.shift
        return Fold(self.axis, self.scale * later.scale, shift)


@dataclass(frozen=True)
class RepairPoint:
    """One group of units: where they are measured, what is matched, how it is folded into weights.

    `module`: the submodule whose input (`where="input"`) or output carries the units.
    `match`: "affine" (mean and std; needs a bias for the shift), "rms" (scale only), or
    "rotary_rms" (scale only, one scale per RoPE pair of each `head_dim`-wide head).
    `folds(scale, shift)` returns tensor name -> Fold for the per-unit `scale`/`shift` vectors.
    `layer_tensor`: the tensor whose interpolation factor t sets this point's goal.
    """

    module: str
    where: str
    match: Match
    layer_tensor: str
    folds: Callable[[torch.Tensor, torch.Tensor], dict[str, Fold]]
    head_dim: int = 0


@dataclass(frozen=True)
class UnitStatistics:
    """Per-unit mean, population std and root mean square over the non-padding tokens (fp64)."""

    mean: torch.Tensor
    std: torch.Tensor
    rms: torch.Tensor


def _rows(name: str, s: torch.Tensor, shapes: Mapping[str, object]) -> dict[str, Fold]:
    """Scale the output rows of a Llama projection (and its bias, where the checkpoint has one)."""
    folds = {f"{name}.weight": Fold(0, s)}
    if f"{name}.bias" in shapes:
        folds[f"{name}.bias"] = Fold(0, s)
    return folds


def llama_points(config: Mapping, n_layers: int, shapes: Mapping[str, object]) -> list[RepairPoint]:
    """`shapes`: the checkpoint's tensor names (Qwen2 has q/k biases, which must scale with q/k)."""
    if "model.layers.0.self_attn.q_proj.weight" not in shapes:
        raise EvomergeError("repair: no repair points for fused q/k/v projections (Phi3); use rebasin without repair")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    points = []
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj"):
            name = f"{p}self_attn.{proj}"
            points.append(
                RepairPoint(
                    name,
                    "output",
                    "rotary_rms",
                    f"{name}.weight",
                    lambda s, b, name=name: _rows(name, s, shapes),
                    head_dim,
                )
            )
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            name = f"{p}{module}.weight"
            points.append(RepairPoint(p + module, "input", "rms", name, lambda s, b, name=name: {name: Fold(1, s)}))
    return points


def _c_attn_folds(prefix: str, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, Fold]:
    """GPT-2's packed q|k|v projection: scale its output columns, shift its bias."""
    return {prefix + "attn.c_attn.weight": Fold(1, scale), prefix + "attn.c_attn.bias": Fold(0, scale, shift)}


def gpt2_points(config: Mapping, n_layers: int, prefix: str) -> list[RepairPoint]:
    """`prefix`: the checkpoint's tensor-name prefix ("transformer." or "" for headless files)."""
    hidden = int(config["n_embd"])
    points = []
    for layer in range(n_layers):
        p, mp = f"{prefix}h.{layer}.", f"transformer.h.{layer}."

        def query_key_folds(s: torch.Tensor, b: torch.Tensor, p: str = p) -> dict[str, Fold]:
            keep = torch.arange(3 * hidden) < 2 * hidden  # the v third is repaired at the c_proj input
            return _c_attn_folds(p, torch.where(keep, s, torch.ones_like(s)), torch.where(keep, b, torch.zeros_like(b)))

        def value_folds(s: torch.Tensor, b: torch.Tensor, p: str = p) -> dict[str, Fold]:
            ones, zeros = torch.ones(2 * hidden, dtype=s.dtype), torch.zeros(2 * hidden, dtype=s.dtype)
            return _c_attn_folds(p, torch.cat([ones, s]), torch.cat([zeros, b]))

        def mlp_folds(s: torch.Tensor, b: torch.Tensor, p: str = p) -> dict[str, Fold]:
            return {p + "mlp.c_fc.weight": Fold(1, s), p + "mlp.c_fc.bias": Fold(0, s, b)}

        c_attn = p + "attn.c_attn.weight"
        points.append(RepairPoint(mp + "attn.c_attn", "output", "affine", c_attn, query_key_folds))
        points.append(RepairPoint(mp + "attn.c_proj", "input", "affine", c_attn, value_folds))
        points.append(RepairPoint(mp + "mlp.c_fc", "output", "affine", p + "mlp.c_fc.weight", mlp_folds))
    return points


@torch.no_grad()
def unit_statistics(
    model: torch.nn.Module, tokens: TokenBatch, points: list[RepairPoint], batch_size: int
) -> dict[str, UnitStatistics]:
    """module name -> per-unit statistics over the non-padding tokens of the calibration data."""
    modules = dict(model.named_modules())
    sums: dict[str, list] = {}
    mask: list[torch.Tensor] = []
    handles = []
    for point in points:

        def hook(module, args, output, point=point):
            z = (args[0] if point.where == "input" else output)[mask[0]].double()
            entry = sums.setdefault(point.module, [0.0, 0.0, 0])
            entry[0] = entry[0] + z.sum(0)
            entry[1] = entry[1] + (z * z).sum(0)
            entry[2] += z.shape[0]

        handles.append(modules[point.module].register_forward_hook(hook))
    try:
        for ids, attention, _loss in tokens.batches(batch_size):
            mask[:] = [attention.bool()]
            model(input_ids=ids, attention_mask=attention)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (s1, s2, n) in sums.items():
        mean, square = s1 / n, s2 / n
        out[name] = UnitStatistics(mean, (square - mean * mean).clamp_min(0).sqrt(), square.sqrt())
    return out


def rotary_pair_rms(rms: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each unit's value replaced by the RMS of its RoPE pair (i, i + head_dim/2 of one head)."""
    pairs = rms.square().reshape(-1, 2, head_dim // 2).mean(1).sqrt()  # [heads, head_dim/2]
    return pairs.repeat(1, 2).reshape(-1)


def _ratio(goal: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """goal / current, and 1 for dead units (no activation to rescale)."""
    return torch.where(current > 1e-12, goal / current.clamp_min(1e-12), torch.ones_like(current))


def repair_map(
    point: RepairPoint, a: UnitStatistics, b: UnitStatistics, merged: UnitStatistics, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per unit that moves the merged model's statistics to the goal at t."""
    zero = torch.zeros_like(merged.mean)
    if point.match == "affine":
        scale = _ratio((1 - t) * a.std + t * b.std, merged.std)
        return scale, (1 - t) * a.mean + t * b.mean - scale * merged.mean
    if point.match == "rms":
        return _ratio((1 - t) * a.rms + t * b.rms, merged.rms), zero
    pa, pb, pm = (rotary_pair_rms(s.rms, point.head_dim) for s in (a, b, merged))
    return _ratio((1 - t) * pa + t * pb, pm), zero


def repair_folds(
    merged: torch.nn.Module,
    endpoint_a: torch.nn.Module,
    endpoint_b: torch.nn.Module,
    tokens: TokenBatch,
    points: list[RepairPoint],
    t_of: Callable[[str], float],
    batch_size: int,
) -> dict[str, Fold]:
    """Folds for every repaired tensor; `merged` is repaired in place, point after point."""
    stats_a = unit_statistics(endpoint_a, tokens, points, batch_size)
    stats_b = unit_statistics(endpoint_b, tokens, points, batch_size)
    params = dict(merged.named_parameters(remove_duplicate=False))
    folds: dict[str, Fold] = {}
    for point in points:
        current = unit_statistics(merged, tokens, [point], batch_size)[point.module]
        scale, shift = repair_map(
            point, stats_a[point.module], stats_b[point.module], current, t_of(point.layer_tensor)
        )
        for name, fold in point.folds(scale.float(), shift.float()).items():
            folds[name] = folds[name].then(fold) if name in folds else fold
            param = params[module_name(name, params)]
            with torch.no_grad():
                param.copy_(fold.apply(param.detach()))
    return folds
