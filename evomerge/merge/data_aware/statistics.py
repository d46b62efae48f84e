"""Per-model statistics for data-aware merges: input Gram matrices and diagonal Fisher.

* Gram: a forward hook on every linear layer (`nn.Linear`, GPT-2 `Conv1D`) accumulates X^T X of
  its input rows, padding positions excluded, as a sum (RegMean's objective; the row count is kept
  so the mean form is available too).
* Fisher: one backward pass per example of that example's log-likelihood sum_t log p(y_t | .)
  over its target tokens; the squared per-example gradient is accumulated and divided by the
  number of examples. (Squaring a batch-summed gradient would add cross-example terms.) Labels are
  the data's tokens (empirical Fisher) or drawn from the model itself (a one-sample Monte-Carlo
  estimate of the true Fisher).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evomerge.merge.data_aware.calibration import TokenBatch


@dataclass
class InputStatistics:
    """What a method's per-tensor step needs about one input model for one tensor."""

    fisher: torch.Tensor | None = None
    fisher_norm: float = 1.0  # global L2 norm of the model's whole Fisher (for `normalize`)
    gram: torch.Tensor | None = None  # [in, in] sum of X^T X
    rows: int = 0  # number of input rows summed into `gram`
    input_axis: int = 1  # the weight's input axis (1: nn.Linear [out, in]; 0: Conv1D [in, out])


def linear_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module, int]]:
    """(weight name, module, input axis of the weight) for every linear layer."""
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield f"{name}.weight", module, 1
        elif isinstance(module, Conv1D):
            yield f"{name}.weight", module, 0


@torch.no_grad()
def collect_grams(
    model: torch.nn.Module, tokens: TokenBatch, batch_size: int, names: set[str] | None = None
) -> dict[str, tuple[torch.Tensor, int]]:
    """Weight name -> (sum of X^T X over non-padding input rows in fp64, row count)."""
    grams: dict[str, list] = {}
    handles = []
    current_mask: list[torch.Tensor] = []

    def hook_for(weight_name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            rows = x[current_mask[0]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            rows = rows.double()
            entry = grams.setdefault(weight_name, [torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64), 0])
            entry[0] += rows.T @ rows
            entry[1] += rows.shape[0]

        return hook

    for weight_name, module, _axis in linear_modules(model):
        if names is None or weight_name in names:
            handles.append(module.register_forward_hook(hook_for(weight_name)))
    try:
        for ids, attention, _loss in tokens.batches(batch_size):
            current_mask[:] = [attention.bool()]
            model(input_ids=ids, attention_mask=attention)
    finally:
        for handle in handles:
            handle.remove()
    return {k: (v[0], v[1]) for k, v in grams.items()}


def collect_fisher(
    model: torch.nn.Module, tokens: TokenBatch, *, sampled: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Parameter name -> mean over examples of the squared per-example log-likelihood gradient."""
    params = dict(model.named_parameters())  # tied weights appear once; their gradient sums both uses
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    count = 0
    for i in range(tokens.input_ids.shape[0]):
        length = int(tokens.attention_mask[i].sum())
        ids = tokens.input_ids[i : i + 1, :length]
        positions = tokens.loss_mask[i, :length].nonzero().flatten()
        positions = positions[positions < length - 1]
        if positions.numel() == 0:
            continue
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, positions].float()
        log_probs = F.log_softmax(logits, dim=-1)
        if sampled:
            labels = torch.multinomial(log_probs.detach().exp(), 1, generator=generator).flatten()
        else:
            labels = ids[0, positions + 1]
        log_likelihood = log_probs.gather(1, labels[:, None]).sum()
        log_likelihood.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name].add_(p.grad.float().square())
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: f / max(count, 1) for name, f in fisher.items()}
