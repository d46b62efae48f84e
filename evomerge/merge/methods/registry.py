"""The one registry of merge methods, keyed by mergekit's YAML names.

Each entry declares its parameters (scope, default, bounds) and its contract (base model needed,
number of inputs, randomness); the planner validates recipes against these declarations before
any tensor is read. The one-line summaries the CLI help shows are in evomerge/merge/method_summaries.py.
"""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.merge.methods.data_aware_methods import DATA_AWARE_METHODS
from evomerge.merge.methods.spec import LazyFn, MergeMethod, ParamSpec

UNIT = {"low": 0.0, "high": 1.0}

WEIGHT = ParamSpec(
    "weight",
    float,
    "model",
    required=True,
    help="weight of this model's contribution (negative subtracts its task vector)",
)
DENSITY = ParamSpec("density", float, "model", default=1.0, **UNIT, help="fraction of the task vector kept")
GAMMA = ParamSpec(
    "gamma", float, "model", default=0.01, **UNIT, help="fraction of largest-magnitude entries removed as outliers"
)
EPSILON = ParamSpec(
    "epsilon", float, "model", default=0.15, **UNIT, help="half-width of DELLA's keep-probability range around density"
)
LAMBDA = ParamSpec("lambda", float, "global", default=1.0, help="scale of the merged task vector")
INT8_MASK = ParamSpec(
    "int8_mask",
    bool,
    "global",
    default=False,
    help="accepted for mergekit compatibility; no effect (masks are boolean)",
)
CONSENSUS = ParamSpec(
    "consensus",
    str,
    "global",
    default="sum",
    choices=("sum", "count"),
    help="TIES sign election: total mass (sum) or vote count",
)
RESCALE_NORM = ParamSpec(
    "rescale_norm",
    str,
    "global",
    default="l1",
    choices=("l1", "inverse"),
    help="rescale kept entries to the task vector's L1 norm (mergekit) or by 1/keep-probability (the papers)",
)

RAM_EPSILON = ParamSpec(
    "epsilon", float, "global", default=1e-5, help="a task-vector entry counts as moved when |delta| > epsilon"
)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, "global", default=default, help="divide by the sum of the (agreeing) weights")


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec("rescale", bool, "global", default=default, help="rescale entries kept by the sparsifier")


# `extra["delta_cache"]`: the method reads its non-base inputs only as task vectors (through
# `MethodCall.take_delta`), and these `DeltaCache` fields speed it up; an in-memory materializer
# keeps such caches resident and skips loading the inputs. Methods without the key read raw inputs.
def _delta_cache(*fields: str) -> dict[str, tuple[str, ...]]:
    return {"delta_cache": fields}


def _task_vector_method(name, fn, *, extra=(), normalize=False, rescale=False, random=False, consensus=False, cache=()):
    params = (WEIGHT, DENSITY, *extra, LAMBDA, _normalize(normalize), _rescale(rescale), INT8_MASK)
    if consensus:
        params += (CONSENSUS,)
    if random:
        params += (RESCALE_NORM,)
    return MergeMethod(name=name, fn=fn, params=params, base="required", random=random, extra=_delta_cache(*cache))


_METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        name="linear",
        fn=LazyFn("evomerge.merge.methods.linear", "linear"),
        base="input",
        params=(ParamSpec("weight", float, "model", required=True, help="weight of this model"), _normalize(True)),
    ),
    MergeMethod(
        name="slerp",
        fn=LazyFn("evomerge.merge.methods.slerp", "slerp"),
        base="required",
        min_inputs=1,
        max_inputs=1,
        params=(ParamSpec("t", float, "global", required=True, help="interpolation factor"),),
    ),
    MergeMethod(
        name="task_arithmetic",
        fn=LazyFn("evomerge.merge.methods.task_arithmetic", "task_arithmetic"),
        base="required",
        params=(WEIGHT, LAMBDA, _normalize(False), INT8_MASK),
        extra=_delta_cache(),
    ),
    _task_vector_method(
        "ties",
        LazyFn("evomerge.merge.methods.task_arithmetic", "ties"),
        normalize=True,
        consensus=True,
        cache=("sorted_abs",),
    ),
    _task_vector_method(
        "dare_ties",
        LazyFn("evomerge.merge.methods.task_arithmetic", "dare_ties"),
        rescale=True,
        random=True,
        consensus=True,
    ),
    _task_vector_method(
        "dare_linear",
        LazyFn("evomerge.merge.methods.task_arithmetic", "dare_linear"),
        rescale=True,
        random=True,
    ),
    _task_vector_method(
        "breadcrumbs",
        LazyFn("evomerge.merge.methods.task_arithmetic", "breadcrumbs"),
        extra=(GAMMA,),
        cache=("sorted_abs",),
    ),
    _task_vector_method(
        "breadcrumbs_ties",
        LazyFn("evomerge.merge.methods.task_arithmetic", "breadcrumbs_ties"),
        extra=(GAMMA,),
        consensus=True,
        cache=("sorted_abs",),
    ),
    _task_vector_method(
        "della",
        LazyFn("evomerge.merge.methods.task_arithmetic", "della"),
        extra=(EPSILON,),
        normalize=True,
        rescale=True,
        random=True,
        consensus=True,
        cache=("row_ranks",),
    ),
    _task_vector_method(
        "della_linear",
        LazyFn("evomerge.merge.methods.task_arithmetic", "della_linear"),
        extra=(EPSILON,),
        rescale=True,
        random=True,
        cache=("row_ranks",),
    ),
    MergeMethod(
        name="model_stock",
        fn=LazyFn("evomerge.merge.methods.model_stock", "model_stock"),
        base="required",
        min_inputs=2,
        params=(
            ParamSpec("filter_wise", bool, "global", default=False, help="one ratio per row"),
            ParamSpec(
                "clamp_t", bool, "global", default=False, help="opt-in: clamp the ratio to [0, 1] (mergekit does not)"
            ),
        ),
    ),
    MergeMethod(
        name="passthrough",
        fn=LazyFn("evomerge.merge.methods.linear", "passthrough"),
        base="input",
        min_inputs=1,
        max_inputs=1,
        params=(ParamSpec("scale", float, "model", default=None, help="multiply this tensor"),),
    ),
    MergeMethod(
        name="arcee_fusion",
        fn=LazyFn("evomerge.merge.methods.fusion", "arcee_fusion"),
        base="required",
        min_inputs=1,
        max_inputs=1,
        random=True,
        params=(),
    ),
    MergeMethod(
        name="sce",
        fn=LazyFn("evomerge.merge.methods.elementwise", "sce"),
        base="required",
        params=(
            ParamSpec(
                "select_topk",
                float,
                "global",
                default=1.0,
                **UNIT,
                help="fraction of entries kept: those whose variance across models is largest",
            ),
            INT8_MASK,
        ),
    ),
    MergeMethod(
        name="nuslerp",
        fn=LazyFn("evomerge.merge.methods.spherical", "nuslerp"),
        base="optional",
        min_inputs=2,
        max_inputs=2,
        params=(
            ParamSpec(
                "weight",
                float,
                "model",
                required=True,
                help="relative weight; t = w2 / (w1 + w2) slerps from the first model to the second",
            ),
            ParamSpec("nuslerp_row_wise", bool, "global", default=False, help="slerp the vectors along dim 0"),
            ParamSpec("nuslerp_flatten", bool, "global", default=True, help="slerp whole tensors, not vectors"),
        ),
    ),
    MergeMethod(
        name="multislerp",
        fn=LazyFn("evomerge.merge.methods.spherical", "multislerp"),
        base="optional",
        params=(
            ParamSpec("weight", float, "model", required=True, help="weight of this model on the sphere"),
            ParamSpec("normalize_weights", bool, "global", default=True, help="divide the weights by their sum"),
            ParamSpec("eps", float, "global", default=1e-8, low=0.0, help="guard against zero norms"),
        ),
    ),
    MergeMethod(
        name="karcher",
        fn=LazyFn("evomerge.merge.methods.spherical", "karcher"),
        base="input",
        params=(
            ParamSpec("max_iter", int, "global", default=10, help="iterations of the Karcher mean"),
            ParamSpec("tol", float, "global", default=1e-5, help="stop when the update is shorter than this"),
        ),
    ),
    MergeMethod(
        name="nearswap",
        fn=LazyFn("evomerge.merge.methods.elementwise", "nearswap"),
        base="required",
        min_inputs=1,
        max_inputs=1,
        params=(
            ParamSpec(
                "t", float, "global", required=True, help="entries closer than t to the base take the other's value"
            ),
        ),
    ),
    MergeMethod(
        name="ram",
        fn=LazyFn("evomerge.merge.methods.elementwise", "ram"),
        base="required",
        params=(RAM_EPSILON,),
    ),
    MergeMethod(
        name="ramplus_tl",
        fn=LazyFn("evomerge.merge.methods.elementwise", "ramplus_tl"),
        base="required",
        params=(
            ParamSpec("r", float, "global", default=0.1, help="strength of the boost of a model's unique entries"),
            ParamSpec("alpha", float, "global", default=0.2, help="cap of the shared/unique ratio in the boost"),
            RAM_EPSILON,
        ),
    ),
)

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (*_METHODS, *DATA_AWARE_METHODS)}


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> MergeMethod:
    """The registered method, or a one-line error that lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise EvomergeError(f"merge_method: unknown method {name!r} (known: {', '.join(REGISTRY)})") from None
