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
    "sce": "select high-variance entries, weight task vectors by energy, erase sign conflicts",
    "nuslerp": "slerp two weighted models (whole tensors or per vector), optionally on task vectors",
    "multislerp": "weighted interpolation of any number of models on the sphere",
    "karcher": "Karcher (Riemannian) mean of the models' directions, times their mean norm",
    "nearswap": "take the other model's value where it is within t of the base",
    "ram": "unique task-vector entries kept whole, overlapping ones averaged",
    "ramplus_tl": "RAM with each model's unique entries boosted by its overlap ratio",
    "fisher": "diagonal-Fisher-weighted average (needs calibration:)",
    "regmean": "closed-form least squares per linear layer from input Grams; others averaged (needs calibration:)",
    "rebasin": "Git Re-Basin weight matching of the model onto the base, then interpolation by t",
    "repair": "(re-based) interpolation with REPAIR's activation statistics restored (needs calibration:)",
}
