"""One covariance-weighted solver for linear averaging, Fisher merging and RegMean (the MaTS view).

Every model i contributes a positive semi-definite "precision" C_i saying in which directions its
parameters matter; the merge minimises sum_i (theta - theta_i)^T C_i (theta - theta_i), i.e. solves
(sum_i C_i) theta = sum_i C_i theta_i. Three shapes of C_i cover the methods:

* `scalar`   C_i = w_i I                        -> weighted average (a soup);
* `diagonal` C_i = diag(w_i max(F_i, eps))       -> Fisher merging;
* `gram`     C_i = w_i G~_i (x) I_out per linear -> RegMean, with G~ = alpha G + (1 - alpha) diag(G).

`fisher` and `regmean` below only decide which precision each tensor gets; `solve` is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import MethodCall

PrecisionKind = Literal["scalar", "diagonal", "gram"]


@dataclass(frozen=True)
class Precision:
    """One model's curvature for one tensor.

    `scalar`: `value` is a float weight. `diagonal`: `value` has the tensor's shape. `gram`: `value`
    is `[in, in]` over the tensor's input axis `input_axis` (1 for `nn.Linear` `[out, in]`, 0 for
    GPT-2's `Conv1D` `[in, out]`); the same Gram applies to every output unit.
    """

    kind: PrecisionKind
    value: float | torch.Tensor
    input_axis: int = 1


def solve(thetas: Sequence[torch.Tensor], precisions: Sequence[Precision], *, ridge: float = 1e-6) -> torch.Tensor:
    """argmin_theta sum_i (theta - theta_i)^T C_i (theta - theta_i), in fp64, returned as fp32.

    Mixed `scalar` and `gram` precisions treat a scalar w as w I; `diagonal` mixes only with `scalar`.
    A singular Gram sum is regularised towards the scalar-weighted average with `ridge` times its
    mean diagonal, so directions no model's data reaches fall back to averaging instead of noise.
    """
    kinds = {p.kind for p in precisions}
    if kinds == {"scalar"}:
        return _scalar_average(thetas, [float(p.value) for p in precisions])
    if "gram" in kinds:
        if "diagonal" in kinds:
            raise ValueError("solve: diagonal and Gram precisions cannot be mixed for one tensor")
        return _gram_solve(thetas, precisions, ridge)
    return _diagonal_solve(thetas, precisions)


def _scalar_average(thetas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    if total <= 0:
        raise EvomergeError("parameters.weight: the weights sum to 0; give at least one model a positive weight")
    out = torch.zeros_like(thetas[0], dtype=torch.float64)
    for theta, w in zip(thetas, weights, strict=True):
        out.add_(theta.double(), alpha=w)
    return (out / total).float()


def _diagonal_solve(thetas: Sequence[torch.Tensor], precisions: Sequence[Precision]) -> torch.Tensor:
    num = torch.zeros_like(thetas[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for theta, p in zip(thetas, precisions, strict=True):
        c = p.value.double() if isinstance(p.value, torch.Tensor) else torch.full_like(num, float(p.value))
        num.add_(c * theta.double())
        den.add_(c)
    if bool((den <= 0).any()):
        raise EvomergeError(
            "fisher: some parameter has zero total precision; raise parameters.epsilon above 0 "
            "or give every model a positive weight"
        )
    return (num / den).float()


def _gram_solve(thetas: Sequence[torch.Tensor], precisions: Sequence[Precision], ridge: float) -> torch.Tensor:
    axis = next(p.input_axis for p in precisions if p.kind == "gram")
    n_in = thetas[0].shape[axis]
    lhs = torch.zeros(n_in, n_in, dtype=torch.float64)
    rhs = torch.zeros(n_in, thetas[0].numel() // n_in, dtype=torch.float64)
    weights = []
    for theta, p in zip(thetas, precisions, strict=True):
        w_t = _as_in_by_out(theta, axis)  # [in, out]
        if p.kind == "gram":
            g = p.value.double()  # type: ignore[union-attr]
            lhs += g
            rhs += g @ w_t
            weights.append(float(torch.diagonal(g).mean()))
        else:
            lhs += float(p.value) * torch.eye(n_in, dtype=torch.float64)
            rhs += float(p.value) * w_t
            weights.append(float(p.value))
    solution = _spd_solve(lhs, rhs)
    if solution is None:
        # Regularise towards the average: (L + r I) W = R + r W_avg.
        r = ridge * float(torch.diagonal(lhs).mean().clamp_min(1e-30))
        average = _as_in_by_out(_scalar_average(thetas, [max(w, 1e-30) for w in weights]), axis).double()
        solution = torch.linalg.solve(lhs + r * torch.eye(n_in, dtype=torch.float64), rhs + r * average)
    return _from_in_by_out(solution, thetas[0].shape, axis).float()


def _spd_solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """Cholesky solve, or None when `lhs` is not (numerically) positive definite."""
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        return None
    solution = torch.cholesky_solve(rhs, factor)
    return solution if bool(torch.isfinite(solution).all()) else None


def _as_in_by_out(theta: torch.Tensor, axis: int) -> torch.Tensor:
    t = theta.double()
    return t.T if axis == 1 else t


def _from_in_by_out(solution: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    return solution.T.reshape(shape) if axis == 1 else solution.reshape(shape)


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): alpha = 1 is exact RegMean, 0 a per-input-feature average."""
    diagonal = torch.diag(torch.diagonal(gram))
    return alpha * gram + (1.0 - alpha) * diagonal


# -- the two data-aware methods as precision choices ------------------------------------------


def _statistics(call: MethodCall, method: str):
    context = call.context
    if context is None:
        raise RuntimeError(f"{method}: {call.tensor_name} was merged without its statistics pre-pass")
    return context.statistics


def fisher(call: MethodCall) -> torch.Tensor:
    """Diagonal-Fisher-weighted average: C_i = weight_i * max(F_i / norm_i, epsilon)."""
    stats = _statistics(call, "fisher")
    epsilon = float(call.params.get("epsilon", 1e-6))
    precisions = []
    for i, p in enumerate(call.input_params):
        f = stats[i].fisher
        assert f is not None, call.tensor_name
        if call.params.get("normalize", False):
            f = f / stats[i].fisher_norm
        precisions.append(Precision("diagonal", float(p["weight"]) * f.double().clamp_min(epsilon)))
    return solve(_inputs(call), precisions)


def regmean(call: MethodCall) -> torch.Tensor:
    """RegMean per linear weight (Grams shrunk by `alpha`); every other tensor a weighted average."""
    stats = _statistics(call, "regmean")
    alpha = float(call.params.get("alpha", 0.9))
    mean_form = call.params.get("gram", "sum") == "mean"
    weights = [float(p["weight"]) for p in call.input_params]
    if any(stats[i].gram is None for i in range(len(weights))):
        # Not a linear layer's own weight (norms, biases, embeddings, a tied head): a weighted average.
        return solve(_inputs(call), [Precision("scalar", w) for w in weights])
    precisions = []
    for i, w in enumerate(weights):
        gram = stats[i].gram.double()  # type: ignore[union-attr]
        if mean_form:
            gram = gram / max(stats[i].rows, 1)
        precisions.append(Precision("gram", w * shrink_off_diagonal(gram, alpha), stats[i].input_axis))
    return solve(_inputs(call), precisions)


def _inputs(call: MethodCall) -> list[torch.Tensor]:
    out = []
    for tensor in call.inputs:
        assert tensor is not None
        out.append(tensor)
    return out
