"""Recipe checks for data-aware methods, run with the other recipe checks before any file is read."""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.merge.data_aware.calibration import calibration_of
from evomerge.merge.methods.spec import MergeMethod
from evomerge.merge.recipe import Recipe


def check_data_aware(recipe: Recipe, method: MergeMethod) -> None:
    """`calibration:` present exactly when the method uses it; per_model names models of the recipe."""
    calibration = calibration_of(recipe)
    if method.extra.get("needs_calibration") and calibration is None:
        raise EvomergeError(
            f"calibration: {method.name} needs calibration data; add a calibration: block "
            "with task: (an lm-eval task) or file: (a jsonl file), examples: and seq_len:"
        )
    if calibration is not None and not method.extra.get("needs_calibration"):
        raise EvomergeError(
            f"calibration: {method.name} does not use calibration data; remove the block "
            "(fisher, regmean and repair use it)"
        )
    if calibration is not None:
        known = recipe.referenced_models()
        for reference in calibration.per_model:
            if reference not in known:
                raise EvomergeError(
                    f"calibration.per_model.{reference}: not a model of this recipe (models: {', '.join(known)})"
                )
    if method.extra.get("models_only") and recipe.slices is not None:
        raise EvomergeError(
            f"slices: {method.name} aligns whole models; write it with base_model: and "
            "models: [{model: ...}] instead of slices:"
        )
