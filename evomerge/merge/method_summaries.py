"""One line per merge method, in registry order, for `evomerge merge --help`.

It lives outside `evomerge.merge.methods` because importing the registry imports torch (about a second),
and the CLI must print its help without it. tests/test_cli.py checks that the names match the
registry's, in order.
"""

from __future__ import annotations

METHOD_SUMMARIES: dict[str, str] = {
    "linear": "weighted average (model soup)",
    "slerp": "spherical interpolation from the base (t=0) to the other model (t=1)",
    "task_arithmetic": "base + lambda * sum of weighted task vectors",
    "ties": "magnitude trim, sign election, disjoint mean",
    "dare_ties": "random drop and rescale, sign election",
    "dare_linear": "random drop and rescale, weighted sum",
    "breadcrumbs": "drop largest outliers and smallest entries, weighted sum",
    "breadcrumbs_ties": "breadcrumbs with sign election",
    "della": "magnitude-ranked random drop, sign election",
    "della_linear": "magnitude-ranked random drop, weighted sum",
    "model_stock": "interpolate base -> mean of fine-tunes by their task-vector angle",
    "passthrough": "copy one source (layer stacking), optionally scaled",
    "arcee_fusion": "keep the other model's changes where they are important",
    "fisher": "diagonal-Fisher-weighted average (needs calibration:)",
    "regmean": "closed-form least squares per linear layer from input Grams; others averaged (needs calibration:)",
    "rebasin": "Git Re-Basin weight matching of the model onto the base, then interpolation by t",
    "repair": "(re-based) interpolation with REPAIR's activation statistics restored (needs calibration:)",
}
