"""Method math against the numeric vectors of shared/reference/methods.md, plus edge cases."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import REGISTRY, DeltaCache, MethodCall, get_method, make_generator
from evomerge.merge.methods.slerp import slerp_tensors
from evomerge.merge.methods.sparsify import (
    apply_keep_mask,
    della_keep_probabilities,
    magnitude_band,
    magnitude_topk,
    rank_band_mask,
)

ATOL = 1e-6


def T(*values, shape=None):
    t = torch.tensor(values, dtype=torch.float64)
    return t.reshape(shape) if shape else t


def run(method, base, inputs, input_params, params=None, seed=None, caches=()):
    m = get_method(method)
    gens = [make_generator(seed, i, "t") for i in range(len(inputs))] if seed is not None else ()
    call = MethodCall("t", base, inputs, input_params, {**_defaults(m), **(params or {})}, gens, caches)
    return m.fn(call)


def _defaults(m):
    return {p.name: p.default for p in m.global_params}


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=ATOL, rtol=0)


# -- linear ------------------------------------------------------------------------------------------

A, B, C = T(1, 2, 3), T(3, 0, -1), T(-2, 4, 0.5)


@pytest.mark.parametrize(
    "inputs,weights,normalize,expected",
    [
        ((A, B), (1, 3), True, [2.5, 0.5, 0.0]),
        ((A, B), (1, 3), False, [10.0, 2.0, 0.0]),
        ((A, B, C), (0.2, 0.3, 0.5), True, [0.1, 2.4, 0.55]),
        ((A, B, C), (1, 1, 2), True, [0.0, 2.5, 0.75]),
    ],
)
def test_linear(inputs, weights, normalize, expected):
    close(run("linear", None, list(inputs), [{"weight": w} for w in weights], {"normalize": normalize}), expected)


# -- slerp -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "v0,v1,t,expected",
    [
        (T(1, 0), T(0, 1), 0.5, [0.707107, 0.707107]),
        (T(1, 2, 3), T(3, 1, -2), 0.3, [2.337553, 2.304080, 1.796402]),
        (T(2, 0), T(0, 4), 0.5, [1.414214, 2.828427]),
        (T(1, 2), T(2, 4.0001), 0.25, [1.25, 2.500025]),  # nearly colinear -> lerp
        (T(1, 0), T(-1, 0), 0.5, [0.0, 0.0]),  # anti-parallel -> lerp
        (T(1, 0), T(-1, 0.001), 0.5, [0.0, 0.0005]),
        (
            T(1, 0.5, -0.5, 2, shape=(2, 2)),
            T(0, 1, 1, 1, shape=(2, 2)),
            0.4,
            [[0.680208, 0.811098], [0.130889, 1.831410]],
        ),
    ],
)
def test_slerp_vectors(v0, v1, t, expected):
    close(slerp_tensors(t, v0, v1), expected)


def test_slerp_endpoints_are_exact():
    v0, v1 = T(1, 2, 3), T(3, 1, -2)
    assert torch.equal(slerp_tensors(0.0, v0, v1), v0)
    assert torch.equal(slerp_tensors(1.0, v0, v1), v1)


def test_slerp_zero_vector_falls_back_to_lerp():
    # mergekit gives sin(t*pi/2) * v1 = 0.707 here; the angle to a zero vector is undefined.
    close(slerp_tensors(0.5, T(0, 0), T(1, 1)), [0.5, 0.5])


def test_slerp_nearly_colinear_large_tensor_is_finite():
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(10_000, generator=g)
    v1 = v0 * (1 + 1e-7) + 1e-9
    out = slerp_tensors(0.3, v0, v1)
    assert torch.isfinite(out).all()
    close(out, torch.lerp(v0, v1, 0.3))


# -- task arithmetic ---------------------------------------------------------------------------------

TH0, TH1, TH2 = T(1, 1, 1, 1), T(2, 0, 1, 1.5), T(0.5, 2, 1, 1.5)


@pytest.mark.parametrize(
    "inputs,weights,params,expected",
    [
        ((TH1, TH2), (1, 1), {"lambda": 0.5}, [1.25, 1.0, 1.0, 1.5]),
        ((TH1, TH2), (0.7, 0.3), {}, [1.55, 0.6, 1.0, 1.5]),
        ((TH1,), (-0.5,), {}, [0.5, 1.5, 1.0, 0.75]),  # negation
        ((TH1, TH2), (1, 1), {"normalize": True}, [1.25, 1.0, 1.0, 1.5]),
    ],
)
def test_task_arithmetic(inputs, weights, params, expected):
    close(run("task_arithmetic", TH0, list(inputs), [{"weight": w} for w in weights], params), expected)


# -- TIES ----------------------------------------------------------------------------------------------

TAU = [T(0.5, -0.2, 0.1, 0.0, 0.9, -0.3), T(-0.4, 0.3, 0.25, 0.05, -0.1, -0.6), T(0.35, -0.15, -0.7, 0.2, 0.45, 0.8)]
ZERO6 = torch.zeros(6, dtype=torch.float64)


def test_ties_trim():
    expected = [[0.5, 0, 0, 0, 0.9, -0.3], [-0.4, 0.3, 0, 0, 0, -0.6], [0, 0, -0.7, 0, 0.45, 0.8]]
    for tau, exp in zip(TAU, expected, strict=True):
        close(magnitude_topk(tau, 0.5), exp)


@pytest.mark.parametrize(
    "weights,density,params,expected",
    [
        ((1, 1, 1), 0.5, {}, [0.5, 0.3, -0.7, 0.0, 0.675, -0.45]),
        ((1, 1, 1), 0.5, {"consensus": "count"}, [0.5, 0.3, -0.7, 0.0, 0.675, -0.45]),
        ((1, 0.5, 2), 0.5, {}, [0.5, 0.3, -0.7, 0.0, 0.6, 0.8]),
        ((1, 1, 1), 0.5, {"normalize": False}, [0.5, 0.3, -0.7, 0.0, 1.35, -0.9]),
        ((1, 1, 1), 0.5, {"lambda": 0.8}, [0.4, 0.24, -0.56, 0.0, 0.54, -0.36]),
        ((1, 1, 1), 1.0, {}, [0.425, -0.175, -0.7, 0.125, 0.675, -0.45]),
    ],
)
def test_ties(weights, density, params, expected):
    ip = [{"weight": w, "density": density} for w in weights]
    close(run("ties", ZERO6, TAU, ip, params), expected)


def test_ties_sum_and_count_elections_differ():
    taus = [T(0.9, 0.5, -0.1), T(-0.2, -0.5, -0.2), T(-0.3, 0.0, 0.6)]
    ip = [{"weight": 1, "density": 1}] * 3
    z = torch.zeros(3, dtype=torch.float64)
    close(run("ties", z, taus, ip, {"consensus": "sum"}), [0.9, 0.5, 0.6])
    close(run("ties", z, taus, ip, {"consensus": "count"}), [-0.25, 0.5, -0.15])


def test_ties_density_zero_returns_base():
    ip = [{"weight": 1, "density": 0.0}] * 3
    base = T(1, 2, 3, 4, 5, 6)
    close(run("ties", base, [base + t for t in TAU], ip), base)


def test_ties_tiny_tensor_keeps_at_least_one_entry():
    base = T(0.0, 0.0, 0.0)
    out = run("ties", base, [T(0.1, -0.5, 0.2)], [{"weight": 1, "density": 0.1}])
    close(out, [0.0, -0.5, 0.0])


def test_topk_ties_in_magnitude_keep_exactly_k_by_index():
    delta = T(1, -1, 1, 1, 0.5)
    mask = rank_band_mask(delta.abs(), 5 - 2, 5)
    # ascending stable ranks: 0.5 -> 0, then the four 1s by index -> 1..4; top-2 = last two indices
    assert mask.tolist() == [False, False, True, True, False]
    assert int(magnitude_topk(delta, 0.5).ne(0).sum()) == 2


# -- DARE (fixed masks) --------------------------------------------------------------------------------

TA_, MA = T(0.1, -0.2, 0.3, -0.4, 0.5, -0.6), torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
TB_, MB = T(-0.3, 0.1, 0.2, 0.4, -0.2, 0.1), torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)


def test_dare_fixed_mask_rescale():
    close(apply_keep_mask(TA_, MA, 0.5, rescale=True), [0.2, 0, 0.6, -0.8, 0, 0])
    close(apply_keep_mask(TA_, MA, 0.5, rescale=True, rescale_norm="l1"), [0.2625, 0, 0.7875, -1.05, 0, 0])
    close(apply_keep_mask(TB_, MB, 0.5, rescale=True), [-0.6, 0.2, 0, 0.8, 0, 0.2])


# -- Breadcrumbs -----------------------------------------------------------------------------------------

TAU_BC = T(0.05, -0.9, 0.3, -0.02, 0.6, 0.15, -0.45, 0.01, 0.2, -0.7)


@pytest.mark.parametrize(
    "density,gamma,expected",
    [
        (0.6, 0.1, [0, 0, 0.3, 0, 0.6, 0.15, -0.45, 0, 0.2, -0.7]),
        (0.5, 0.2, [0, 0, 0.3, 0, 0.6, 0.15, -0.45, 0, 0.2, 0]),
        (0.9, 0.05, [0.05, -0.9, 0.3, -0.02, 0.6, 0.15, -0.45, 0, 0.2, -0.7]),  # gamma*n < 1: no top cut
        (0.3, 0.8, [0.05, 0, 0, -0.02, 0, 0, 0, 0.01, 0, 0]),  # top cut clipped
    ],
)
def test_breadcrumbs_band(density, gamma, expected):
    close(magnitude_band(TAU_BC, density, gamma), expected)


def test_breadcrumbs_merges():
    tau2 = T(-0.1, 0.4, 0.35, 0.05, -0.5, 0.25, 0.3, -0.02, 0.1, 0.8)
    z = torch.zeros(10, dtype=torch.float64)
    ip = [{"weight": 1, "density": 0.6, "gamma": 0.1}] * 2
    close(run("breadcrumbs", z, [TAU_BC, tau2], ip), [0, 0.4, 0.65, 0, 0.1, 0.4, -0.15, 0, 0.3, -0.7])
    close(run("breadcrumbs_ties", z, [TAU_BC, tau2], ip), [0, 0.4, 0.65, 0, 0.6, 0.4, -0.45, 0, 0.3, -0.7])


def test_breadcrumbs_gamma_zero_is_not_all_zero():
    out = magnitude_band(TAU_BC, 0.9, 0.0)
    assert int(out.ne(0).sum()) == 9


# -- DELLA -------------------------------------------------------------------------------------------------

DELTA_D = T(0.1, -0.5, 0.3, 0.2, -0.4, -0.3, 0.05, 0.6, -0.1, 0.2, shape=(2, 5))
Q_D = [[0.5, 0.7, 0.6, 0.55, 0.65], [0.65, 0.5, 0.7, 0.55, 0.6]]
MASK_D = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)


def test_della_probabilities_and_fixed_mask():
    probs = della_keep_probabilities(DELTA_D, 0.6, 0.1)
    close(probs, Q_D)
    close(
        apply_keep_mask(DELTA_D, MASK_D, probs, rescale=True),
        [[0, -0.714286, 0.5, 0, -0.615385], [-0.461538, 0, 0.857143, 0, 0.333333]],
    )
    close(
        apply_keep_mask(DELTA_D, MASK_D, probs, rescale=True, rescale_norm="l1"),
        [[0, -0.597826, 0.358696, 0, -0.478261], [-0.358696, 0, 0.717391, 0, 0.239130]],
    )
    close(della_keep_probabilities(T(0.3, -0.1, 0.2), 0.5, 0.2), [0.7, 0.3, 0.5])


def test_della_fuse_with_fixed_masks():
    rows = [
        apply_keep_mask(DELTA_D[i], MASK_D[i], della_keep_probabilities(DELTA_D[i], 0.6, 0.1), rescale=True)
        for i in range(2)
    ]
    z = torch.zeros(5, dtype=torch.float64)
    ip = [{"weight": 1, "density": 1.0}] * 2  # density 1: the pre-dropped rows pass through unchanged
    close(run("della", z, rows, ip, {"lambda": 1.1}), [-0.507692, -0.785714, 0.746429, 0.0, -0.676923])


def test_della_single_element_rows_and_edges():
    one = T(0.7)
    assert torch.equal(della_keep_probabilities(one, 0.4, 0.2), T(0.4))
    # epsilon wider than the room to 0 or 1 is clipped, so probabilities stay in [0, 1]
    probs = della_keep_probabilities(T(1, 2, 3, 4), 0.05, 0.15)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 0.1 + 1e-12
    close(probs.mean(), 0.05)


# -- Model Stock -------------------------------------------------------------------------------------------

W0 = T(1, 1, 1, 1)


@pytest.mark.parametrize(
    "inputs,params,expected",
    [
        ((T(2, 1.5, 1, 0.5), T(1.5, 2, 1.5, 1)), {}, [1.6, 1.6, 1.2, 0.8]),
        ((T(2, 1.5, 1, 0.5), T(1.5, 2, 1.5, 1), T(2, 2, 1.5, 1)), {}, [1.773597, 1.773597, 1.309439, 0.845281]),
        # cos < 0: mergekit's (default) unclamped t extrapolates; the opt-in clamp gives t = 0 -> base
        ((T(2, 1.5, 1, 0.5), T(0, 1, 2, 1)), {}, [1.0, 0.316987, -0.366025, 1.683013]),
        ((T(2, 1.5, 1, 0.5), T(0, 1, 2, 1)), {"clamp_t": True}, [1, 1, 1, 1]),
    ],
)
def test_model_stock(inputs, params, expected):
    close(run("model_stock", W0, list(inputs), [{}] * len(inputs), params), expected)


def test_model_stock_filter_wise():
    w0, w1, w2 = T(1, 1, 0, 0, shape=(2, 2)), T(2, 1, 1, 0, shape=(2, 2)), T(1, 2, 1, 0.5, shape=(2, 2))
    close(run("model_stock", w0, [w1, w2], [{}, {}], {"filter_wise": True}), [[1, 1], [0.944272, 0.236068]])
    close(run("model_stock", w0, [w1, w2], [{}, {}]), [[1.320377, 1.320377], [0.640754, 0.160189]])


# -- passthrough ---------------------------------------------------------------------------------------------


def test_passthrough_scale():
    x = T(1, -2, 3)
    close(run("passthrough", None, [x], [{"scale": 0.5}]), [0.5, -1, 1.5])
    assert torch.equal(run("passthrough", None, [x], [{"scale": None}]), x)


# -- precomputed caches give the same answer -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ties", {}),
        ("breadcrumbs", {"gamma": 0.05}),
        ("breadcrumbs_ties", {"gamma": 0.0}),
        ("della", {"epsilon": 0.1}),
        ("dare_ties", {}),
    ],
)
def test_delta_cache_is_equivalent(method, extra):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g)
    inputs = [base + 0.01 * torch.randn(64, 48, generator=g) for _ in range(3)]
    # quantize so that equal magnitudes (rank ties) really occur
    inputs = [base + torch.round((x - base) * 300) / 300 for x in inputs]
    ip = [{"weight": w, "density": d, **extra} for w, d in ((1.0, 0.3), (0.5, 0.6), (0.8, 0.01))]
    plain = run(method, base, inputs, ip, seed=7)
    caches = [DeltaCache.build(x - base, row_ranks=True) for x in inputs]
    cached = run(method, base, [None] * 3, ip, seed=7, caches=caches)
    assert torch.equal(plain, cached)


# -- SCE -----------------------------------------------------------------------------------------------------

ONES = T(1, 1, 1, 1)
SCE_INPUTS = [ONES + T(2, -1, 2, 0), ONES + T(1, 1, -1, 4)]


@pytest.mark.parametrize(
    "select_topk,expected",
    [
        # energies 9/4 and 19/4 -> weights 9/28, 19/28; elected signs all +; entry 0: (2*9 + 1*19)/28
        (1.0, [1 + 37 / 28, 2, 3, 5]),
        # variances [0.25, 1, 2.25, 4]: the top half keeps entries 2 and 3 only
        (0.5, [1, 1, 3, 5]),
        (0.0, [1, 1, 1, 1]),
    ],
)
def test_sce(select_topk, expected):
    close(run("sce", ONES, list(SCE_INPUTS), [{}, {}], {"select_topk": select_topk}), expected)


def test_sce_erases_the_minority_sign():
    # entry 0: +3 (energy-weighted heavier) against -1: the minority -1 is erased, not averaged in
    out = run("sce", T(0, 0), [T(3, 0), T(-1, 1)], [{}, {}])
    close(out, [3, 1])


# -- NuSLERP -------------------------------------------------------------------------------------------------

R = 0.7071067811865476  # sin(pi/4)


def test_nuslerp_weights_give_t():
    # w = [1, 3] -> t = 0.75; orthogonal unit vectors -> [sin(pi/8), sin(3pi/8)]
    ip = [{"weight": 1.0}, {"weight": 3.0}]
    close(run("nuslerp", None, [T(1, 0), T(0, 1)], ip), [0.382683, 0.923880])
    # with a base, the task vectors are slerped and added to it
    close(run("nuslerp", T(1, 1), [T(2, 1), T(1, 2)], ip), [1.382683, 1.923880])
    # weights summing to ~0 give t = 0.5
    close(run("nuslerp", None, [T(1, 0), T(0, 1)], [{"weight": 1.0}, {"weight": -1.0}]), [R, R])


@pytest.mark.parametrize(
    "params,expected",
    [
        # whole tensor: cos = 2/sqrt(10), both coefficients sin(theta/2)/sin(theta) = 0.553432
        ({}, [[0.553432, 0.553432], [0.0, 1.660296]]),
        # per row: row 0 orthogonal -> [R, R]; row 1 colinear -> lerp
        ({"nuslerp_flatten": False}, [[R, R], [0.0, 1.5]]),
        # per column (row_wise): column 0 meets a zero vector (cos taken as 0); column 1 cos = 2/sqrt(5)
        ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [[R, 0.513743], [0.0, 1.541229]]),
    ],
)
def test_nuslerp_flatten_rows_and_columns(params, expected):
    v0, v1 = T(1, 0, 0, 1, shape=(2, 2)), T(0, 1, 0, 2, shape=(2, 2))
    close(run("nuslerp", None, [v0, v1], [{"weight": 1.0}, {"weight": 1.0}], params), expected)


# -- Multi-SLERP ----------------------------------------------------------------------------------------------


def test_multislerp():
    # the weighted tangent vectors cancel at the weighted mean direction, so the result is that
    # direction ([1, 3]/sqrt(10)) times the weighted mean norm (0.25 * 2 + 0.75 * 4 = 3.5)
    ip = [{"weight": 1.0}, {"weight": 3.0}]
    close(run("multislerp", None, [T(2, 0), T(0, 4)], ip), [1.106797, 3.320392])
    close(run("multislerp", T(1, 1), [T(3, 1), T(1, 5)], ip), [2.106797, 4.320392])
    # normalize_weights: false uses the weights as they are: direction as above, norm 1 * 2 + 3 * 4
    close(run("multislerp", None, [T(2, 0), T(0, 4)], ip, {"normalize_weights": False}), [4.427189, 13.281566])
    # a single model is returned as is
    close(run("multislerp", T(5, 5), [T(2, 0)], ip[:1]), [2, 0])


def test_multislerp_antipodal_inputs():
    ip = [{"weight": 1.0}, {"weight": 1.0}]
    close(run("multislerp", None, [T(1, 0), T(-1, 0)], ip), [0, 0])  # two: the weighted sum
    three = [T(1, 0), T(-1, 0), T(0, 0)]
    with pytest.raises(EvomergeError, match="multislerp"):
        run("multislerp", None, three, ip + [{"weight": 0.0}])
    # nothing moved at all (every task vector zero): the base, not an error
    close(run("multislerp", T(1, 2), [T(1, 2)] * 3, ip + [{"weight": 1.0}]), [1, 2])


# -- Karcher mean ---------------------------------------------------------------------------------------------


def test_karcher_is_the_angle_average_not_the_euclidean_mean():
    # directions at 0, 0 and 90 degrees: the Karcher mean is at 30 degrees (the normalised Euclidean
    # mean would be at 26.57); norms 2, 1, 3 -> mean norm 2
    out = run("karcher", None, [T(2, 0), T(1, 0), T(0, 3)], [{}] * 3)
    close(out, [3**0.5, 1.0])


def test_karcher_edge_cases():
    close(run("karcher", None, [T(1, 0), T(0, 1)], [{}, {}]), [R, R])
    close(run("karcher", None, [T(3, 4)], [{}]), [3, 4])
    close(run("karcher", None, [T(0, 0), T(0, 0)], [{}, {}]), [0, 0])
    # a zero tensor has no direction but its norm (0) still counts in the mean norm
    close(run("karcher", None, [T(0, 0), T(0, 2)], [{}, {}]), [0, 1])
    # max_iter: 0 stops at the normalised Euclidean mean
    close(run("karcher", None, [T(2, 0), T(1, 0), T(0, 3)], [{}] * 3, {"max_iter": 0}), [1.788854, 0.894427])


# -- NearSwap -------------------------------------------------------------------------------------------------


def test_nearswap():
    # weight min(1, t / |a - b|): 0.05 -> swapped; 0.2 -> half way; 1 -> a tenth; equal -> unchanged
    out = run("nearswap", T(0, 0, 0, 0), [T(0.05, -0.2, 1, 0)], [{}], {"t": 0.1})
    close(out, [0.05, -0.1, 0.1, 0])


# -- RAM / RAM+ ---------------------------------------------------------------------------------------------

ZERO5 = T(0, 0, 0, 0, 0)
RAM_INPUTS = [T(1, 0, 2, 0, 0), T(3, 0, 0, 1e-6, 0), T(5, 4, 0, 0, 6)]


def test_ram():
    # entry 0: three models moved it -> their mean; 1, 2, 4: one model -> its value whole;
    # entry 3: 1e-6 <= epsilon counts as unmoved
    close(run("ram", ZERO5, list(RAM_INPUTS), [{}] * 3), [3, 4, 2, 0, 6])
    close(run("ram", ZERO5, list(RAM_INPUTS), [{}] * 3, {"epsilon": 1e-7}), [3, 4, 2, 1e-6, 6])


@pytest.mark.parametrize(
    "params,expected",
    [
        # model 1: 1 shared / 1 unique -> boost 1 + 0.5 * 1; model 3: 1 shared / 2 unique -> 1 + 0.5 * 0.5
        ({"r": 0.5, "alpha": 1.0}, [3, 5, 3, 0, 7.5]),
        # alpha caps both ratios at 0.2 -> boost 1.1
        ({"r": 0.5, "alpha": 0.2}, [3, 4.4, 2.2, 0, 6.6]),
        ({"r": 0.0}, [3, 4, 2, 0, 6]),  # no boost: RAM
    ],
)
def test_ramplus_tl(params, expected):
    close(run("ramplus_tl", ZERO5, list(RAM_INPUTS), [{}] * 3, params), expected)


def test_registry_has_every_required_method():
    required = {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "passthrough",
        "arcee_fusion",
        "sce",
        "nuslerp",
        "multislerp",
        "karcher",
        "nearswap",
        "ram",
        "ramplus_tl",
    }
    assert required <= set(REGISTRY)
    assert {m.name for m in REGISTRY.values() if m.random} == {
        "dare_ties",
        "dare_linear",
        "della",
        "della_linear",
        "arcee_fusion",
    }


def test_rank_band_mask_matches_a_stable_sort_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        values = torch.randint(0, 5, (n,), generator=g).float()  # heavy ties
        lo = int(torch.randint(0, n + 1, (1,), generator=g))
        hi = int(torch.randint(lo, n + 1, (1,), generator=g))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.sort(values, stable=True).indices[lo:hi]] = True
        assert torch.equal(rank_band_mask(values, lo, hi), expected)
        assert torch.equal(rank_band_mask(values, lo, hi, values.sort().values), expected)
