"""REPAIR for decoders: restore the activation statistics that interpolation collapses.

For every repaired unit, the goal is the interpolation of the endpoints' statistics on the
calibration data, mu* = (1 - t) mu_A + t mu_B and sigma* = (1 - t) sigma_A + t sigma_B (B already
permuted into A's basis), and the merged model's unit z is mapped to (z - mu) sigma*/sigma + mu*.
Layers are repaired in order, each measured after the earlier ones are repaired (the exact,
sequential variant). The map is folded into weights, so the output is a plain model:

* GPT-2: MLP pre-activations (c_fc output: scale the columns, shift the bias) and attention value
  channels (input of attn.c_proj: scale the v columns of c_attn and shift their bias; attention
  weights sum to 1, so a shift of v shifts the output by the same amount). Full affine repair.
* Llama-style (no biases): the MLP hidden units and the attention output channels, i.e. the inputs
  of down_proj and o_proj, scaled through those layers' columns. Without a bias only the standard
  deviation can be matched; the mean follows the scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from evomerge.data_aware.calibration import TokenBatch


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


@dataclass(frozen=True)
class RepairPoint:
    """One group of units: where they are measured and how the repair is folded into weights.

    `module`: the submodule whose input (`where="input"`) or output carries the units.
    `folds(scale, shift)` returns tensor name -> Fold for the measured `scale`/`shift` vectors.
    `layer_tensor`: the tensor whose interpolation factor t sets this point's goal.
    """

    module: str
    where: str
    affine: bool
    layer_tensor: str
    folds: Callable[[torch.Tensor, torch.Tensor], dict[str, Fold]]


def llama_points(config: Mapping, n_layers: int) -> list[RepairPoint]:
    points = []
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            name = f"{p}{module}.weight"
            points.append(RepairPoint(p + module, "input", False, name,
                                      lambda s, b, name=name: {name: Fold(1, s)}))
    return points


def gpt2_points(config: Mapping, n_layers: int, prefix: str) -> list[RepairPoint]:
    """`prefix`: the checkpoint's tensor-name prefix ("transformer." or "" for headless files)."""
    hidden = int(config["n_embd"])
    points = []
    for layer in range(n_layers):
        p, mp = f"{prefix}h.{layer}.", f"transformer.h.{layer}."

        def value_folds(s: torch.Tensor, b: torch.Tensor, p: str = p) -> dict[str, Fold]:
            ones, zeros = torch.ones(2 * hidden, dtype=s.dtype), torch.zeros(2 * hidden, dtype=s.dtype)
            scale = torch.cat([ones, s])
            return {p + "attn.c_attn.weight": Fold(1, scale),
                    p + "attn.c_attn.bias": Fold(0, scale, torch.cat([zeros, b]))}

        def mlp_folds(s: torch.Tensor, b: torch.Tensor, p: str = p) -> dict[str, Fold]:
            return {p + "mlp.c_fc.weight": Fold(1, s), p + "mlp.c_fc.bias": Fold(0, s, b)}

        points.append(RepairPoint(mp + "attn.c_proj", "input", True, p + "attn.c_attn.weight", value_folds))
        points.append(RepairPoint(mp + "mlp.c_fc", "output", True, p + "mlp.c_fc.weight", mlp_folds))
    return points


@torch.no_grad()
def unit_statistics(model: torch.nn.Module, tokens: TokenBatch, points: list[RepairPoint], batch_size: int
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (mean, population std) per unit over the non-padding tokens, in fp64."""
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
        mean = s1 / n
        out[name] = (mean, (s2 / n - mean * mean).clamp_min(0).sqrt())
    return out


def repair_folds(merged: torch.nn.Module, endpoint_a: torch.nn.Module, endpoint_b: torch.nn.Module,
                 tokens: TokenBatch, points: list[RepairPoint], t_of: Callable[[str], float],
                 batch_size: int) -> dict[str, Fold]:
    """Folds for every repaired tensor; `merged` is repaired in place, layer after layer."""
    stats_a = unit_statistics(endpoint_a, tokens, points, batch_size)
    stats_b = unit_statistics(endpoint_b, tokens, points, batch_size)
    params = dict(merged.named_parameters(remove_duplicate=False))
    folds: dict[str, Fold] = {}
    for point in points:
        t = t_of(point.layer_tensor)
        (mu_a, sd_a), (mu_b, sd_b) = stats_a[point.module], stats_b[point.module]
        goal_mu, goal_sd = (1 - t) * mu_a + t * mu_b, (1 - t) * sd_a + t * sd_b
        mu, sd = unit_statistics(merged, tokens, [point], batch_size)[point.module]
        scale = torch.where(sd > 1e-12, goal_sd / sd.clamp_min(1e-12), torch.ones_like(sd))
        shift = goal_mu - scale * mu if point.affine else torch.zeros_like(mu)
        for name, fold in point.folds(scale.float(), shift.float()).items():
            folds[name] = fold
            param = params[module_name(name, params)]
            with torch.no_grad():
                param.copy_(fold.apply(param.detach()))
    return folds
