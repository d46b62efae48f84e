"""Registry entries of the data-aware methods (fisher, regmean, rebasin, repair).

Each declares `extra["prepare"]`: the model-level pre-pass `run_plan` runs before the first tensor
(statistics or permutations, see evomerge.merge.data_aware.prepare), and whether it needs a
`calibration:` block. The pre-pass module is imported lazily: it depends on the planner, which
imports this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import evomerge.merge.data_aware.calibration  # noqa: F401  (registers the `calibration:` recipe block)
from evomerge.merge.methods.spec import LazyFn, MergeMethod, ParamSpec


def _lazy(attr: str, *args: Any) -> Callable[..., Any]:
    def prepare(plan: Any, source: Any, device: Any) -> Any:
        from evomerge.merge.data_aware import prepare as module

        fn = getattr(module, attr)
        return (fn(*args) if args else fn)(plan, source, device)

    return prepare


WEIGHT = ParamSpec(
    "weight",
    float,
    "model",
    default=1.0,
    low=0.0,
    help="scales this model's precision (Fisher or Gram); 0 leaves it out",
)
T = ParamSpec(
    "t",
    float,
    "model",
    required=True,
    low=0.0,
    high=1.0,
    help="interpolation factor: 0 gives the base model A, 1 gives B permuted into A's basis",
)
RESIDUAL = ParamSpec(
    "residual", bool, "global", default=True, help="also match one residual-stream permutation shared by all layers"
)
MAX_SWEEPS = ParamSpec(
    "max_sweeps", float, "global", default=100, low=1, help="most coordinate-descent sweeps of weight matching"
)

DATA_AWARE_METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        name="fisher",
        fn=LazyFn("evomerge.merge.methods.covariance", "fisher"),
        base="ignored",
        min_inputs=2,
        params=(
            WEIGHT,
            ParamSpec(
                "epsilon",
                float,
                "global",
                default=1e-6,
                low=0.0,
                help="floor of every Fisher entry (entries no data reaches are averaged)",
            ),
            ParamSpec(
                "normalize",
                bool,
                "global",
                default=False,
                help="divide each model's Fisher by its global L2 norm first",
            ),
        ),
        extra={"prepare": _lazy("prepare_statistics", "fisher"), "needs_calibration": True},
    ),
    MergeMethod(
        name="regmean",
        fn=LazyFn("evomerge.merge.methods.covariance", "regmean"),
        base="ignored",
        min_inputs=2,
        params=(
            WEIGHT,
            ParamSpec(
                "alpha",
                float,
                "global",
                default=0.9,
                low=0.0,
                high=1.0,
                help="scale of the Grams' off-diagonal entries (1: exact RegMean)",
            ),
            ParamSpec(
                "gram",
                str,
                "global",
                default="sum",
                choices=("sum", "mean"),
                help="sum of X^T X (the objective) or per-row mean (reweights models by token count)",
            ),
        ),
        extra={"prepare": _lazy("prepare_statistics", "gram"), "needs_calibration": True},
    ),
    MergeMethod(
        name="rebasin",
        fn=LazyFn("evomerge.merge.methods.alignment", "rebasin"),
        base="required",
        min_inputs=1,
        max_inputs=1,
        params=(T, RESIDUAL, MAX_SWEEPS),
        extra={"prepare": _lazy("prepare_rebasin"), "models_only": True},
    ),
    MergeMethod(
        name="repair",
        fn=LazyFn("evomerge.merge.methods.alignment", "repair"),
        base="required",
        min_inputs=1,
        max_inputs=1,
        params=(
            T,
            RESIDUAL,
            MAX_SWEEPS,
            ParamSpec(
                "permute",
                bool,
                "global",
                default=True,
                help="weight-match the model onto the base before interpolating",
            ),
        ),
        extra={"prepare": _lazy("prepare_repair"), "needs_calibration": True, "models_only": True},
    ),
)
