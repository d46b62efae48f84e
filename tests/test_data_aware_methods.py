"""Data-aware merge maths against fixed vectors (methods.md §9-§13) and closed forms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evomerge.merge.data_aware.calibration import TokenBatch
from evomerge.merge.data_aware.permutation import AxisPerm, PermutationSpec, apply_permutation, weight_matching
from evomerge.merge.data_aware.prepare import JobContext
from evomerge.merge.data_aware.repair import Fold, RepairPoint, repair_folds, rotary_pair_rms, unit_statistics
from evomerge.merge.data_aware.statistics import InputStatistics, collect_fisher, collect_grams
from evomerge.merge.methods.base import MethodCall
from evomerge.merge.methods.covariance import Precision, fisher, regmean, solve

torch.set_num_threads(1)
T = torch.tensor

W1 = T([[1, 0, -1], [0.5, 2, 0]], dtype=torch.float64)
W2 = T([[0, 1, 1], [-1, 0.5, 1.5]], dtype=torch.float64)
X1 = T([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
X2 = T([[2, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.float64)


def regmean_call(grams, rows, alpha, gram_form="sum", weights=(1.0, 1.0)):
    stats = [InputStatistics(gram=g, rows=r) for g, r in zip(grams, rows, strict=True)]
    return MethodCall(
        tensor_name="layer.weight",
        base=None,
        inputs=[W1.float(), W2.float()],
        input_params=[{"weight": w} for w in weights],
        params={"alpha": alpha, "gram": gram_form},
        context=JobContext(statistics=stats),
    )


@pytest.mark.parametrize(
    ("alpha", "form", "expected"),
    [
        (1.0, "sum", [[0.439560, 0.945055, 0.197802], [-0.126374, 1.703297, -0.131868]]),
        (0.5, "sum", [[0.323792, 0.746869, 0.441860], [-0.487478, 1.300984, 0.732558]]),
        (0.0, "sum", [[0.250000, 0.600000, 0.500000], [-0.625000, 1.100000, 1.125000]]),
        (1.0, "mean", [[0.486210, 0.894471, 0.118218], [-0.076460, 1.757607, -0.184902]]),
        (0.5, "mean", [[0.374942, 0.700602, 0.349879], [-0.414924, 1.388362, 0.643300]]),
    ],
)
def test_regmean_reference_vectors(alpha, form, expected):
    out = regmean(regmean_call([X1.T @ X1, X2.T @ X2], [4, 5], alpha, form))
    assert torch.allclose(out.double(), T(expected, dtype=torch.float64), atol=1e-6)


def test_regmean_with_equal_grams_is_the_plain_average():
    g = X2.T @ X2
    out = regmean(regmean_call([g, g], [5, 5], 1.0))
    assert torch.allclose(out.double(), (W1 + W2) / 2, atol=1e-6)


def test_mats_generic_precisions_and_scalar_soup():
    c1 = T([[2, 0.5, 0], [0.5, 1, 0], [0, 0, 1]], dtype=torch.float64)
    c2 = T([[1, 0, 0], [0, 3, 1], [0, 1, 2]], dtype=torch.float64)
    thetas = [T([[1.0, 0, 2]]), T([[0.0, 2, -1]])]
    out = solve(thetas, [Precision("gram", c1), Precision("gram", c2)])
    assert torch.allclose(out, T([[0.457364, 1.255814, 0.248062]]), atol=1e-6)
    soup = solve(thetas, [Precision("scalar", 1.0), Precision("scalar", 3.0)])
    assert torch.allclose(soup, (thetas[0] + 3 * thetas[1]) / 4)


def test_fisher_merge_vectors_and_floor():
    stats = [InputStatistics(fisher=T([1, 0.1, 0])), InputStatistics(fisher=T([3, 0.9, 0]))]
    call = MethodCall(
        tensor_name="w",
        base=None,
        inputs=[T([1, 2, 0.5]), T([3, -2, -1])],
        input_params=[{"weight": 0.5}, {"weight": 0.5}],
        params={"epsilon": 1e-6},
        context=JobContext(statistics=stats),
    )
    # The floor applies to every model: entries no model's data reaches become the plain average.
    assert torch.allclose(fisher(call), T([2.5, -1.6, -0.25]), atol=1e-6)
    normalized = dict(call.params, normalize=True)
    stats[0].fisher_norm, stats[1].fisher_norm = 1.004988, 3.132092
    out = fisher(
        MethodCall(
            tensor_name="w",
            base=None,
            inputs=call.inputs,
            input_params=call.input_params,
            params=normalized,
            context=call.context,
        )
    )
    assert torch.allclose(out[:2], T([1.980945, -0.971143]), atol=2e-5)


class FeatureModel(torch.nn.Module):
    """Token -> fixed feature row (an embedding) -> one linear layer: known inputs for hooks."""

    def __init__(self, features: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(features.float(), freeze=True)
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.proj(self.embed(input_ids)))


def test_regmean_from_hooked_grams_equals_least_squares():
    """Grams gathered by forward hooks (padding masked) + the solver = numpy's least-squares fit of
    [X1; X2] W^T = [X1 W1^T; X2 W2^T]."""
    rng = np.random.default_rng(0)
    d_in, d_out = 5, 3
    xs = [rng.normal(size=(9, d_in)), rng.normal(size=(12, d_in))]
    ws = [rng.normal(size=(d_out, d_in)), rng.normal(size=(d_out, d_in))]
    stats = []
    for x, w in zip(xs, ws, strict=True):
        pad_row = np.full((1, d_in), 100.0)  # what padding would contribute if it were not masked
        model = FeatureModel(torch.tensor(np.vstack([pad_row, x])), torch.tensor(w, dtype=torch.float32))
        ids = torch.zeros(3, 5, dtype=torch.long)  # 3 sequences of length 5, right-padded with token 0
        mask = torch.zeros(3, 5, dtype=torch.long)
        tokens = list(range(1, len(x) + 1))
        for row in range(3):
            chunk = tokens[row * 5 : row * 5 + 5]
            ids[row, : len(chunk)], mask[row, : len(chunk)] = torch.tensor(chunk), 1
        grams = collect_grams(model, TokenBatch(ids, mask, mask.bool()), batch_size=2)
        gram, rows = grams["proj.weight"]
        assert rows == len(x)
        stats.append(InputStatistics(gram=gram, rows=rows))
    call = MethodCall(
        tensor_name="proj.weight",
        base=None,
        inputs=[torch.tensor(w, dtype=torch.float32) for w in ws],
        input_params=[{"weight": 1.0}, {"weight": 1.0}],
        params={"alpha": 1.0, "gram": "sum"},
        context=JobContext(statistics=stats),
    )
    x_all = np.vstack(xs)
    y_all = np.vstack([x @ w.T for x, w in zip(xs, ws, strict=True)])
    expected = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T
    assert np.allclose(regmean(call).numpy(), expected, atol=1e-5)


def test_fisher_is_per_example_squared_not_a_squared_batch_sum():
    """Softmax-linear closed form: the empirical Fisher of W for two labelled examples (§9 vectors)."""
    w = T([[0.5, -1], [0.2, 0.3], [-0.4, 0.1]])
    features = torch.zeros(5, 2)
    features[3], features[4] = T([1.0, 2]), T([-1.0, 0.5])  # tokens 3, 4 carry the inputs; 0-2 are classes
    model = FeatureModel(features, w)
    ids = T([[3, 0], [4, 2]])  # example n: input token, then its label
    mask = torch.ones(2, 2, dtype=torch.long)
    loss = T([[True, False], [True, False]])
    f = collect_fisher(model, TokenBatch(ids, mask, loss))["proj.weight"]
    expected = T([[0.442158, 1.738197], [0.286237, 0.941455], [0.135749, 0.151665]])
    assert torch.allclose(f, expected, atol=1e-5)
    model.zero_grad()
    logp = torch.log_softmax(model(ids[:, :1]).logits[:, 0], -1)
    logp[torch.arange(2), ids[:, 1]].sum().backward()
    assert not torch.allclose(model.proj.weight.grad.square() / 2, expected, atol=1e-2)


def test_weight_matching_two_hidden_layer_vector():
    a = {
        "W0": T([[0.13, -0.13, 0.64], [0.10, -0.54, 0.36], [1.30, 0.95, -0.70], [-1.27, -0.62, 0.04]]),
        "b0": T([-2.33, -0.22, -1.25, -0.73]),
        "W1": T(
            [
                [-0.54, -0.32, 0.41, 1.04],
                [-0.13, 1.37, -0.67, 0.35],
                [0.90, 0.09, -0.74, -0.92],
                [-0.46, 0.22, -1.01, -0.21],
            ]
        ),
        "b1": T([-0.16, 0.54, 0.21, 0.36]),
        "W2": T([[-0.65, -0.13, 0.78, 1.49], [-1.26, 1.51, 1.35, 0.78]]),
    }
    p0, p1 = T([3, 1, 0, 2]), T([1, 3, 2, 0])
    b = {"W0": a["W0"][p0], "b0": a["b0"][p0], "W1": a["W1"][p1][:, p0], "b1": a["b1"][p1], "W2": a["W2"][:, p1]}
    spec = PermutationSpec(
        sizes={"P0": 4, "P1": 4},
        axes={
            "W0": [AxisPerm("P0", 0)],
            "b0": [AxisPerm("P0", 0)],
            "W1": [AxisPerm("P1", 0), AxisPerm("P0", 1)],
            "b1": [AxisPerm("P1", 0)],
            "W2": [AxisPerm("P1", 1)],
        },
    )
    perms, sweeps = weight_matching(spec, a, b)
    assert perms["P0"].tolist() == [2, 1, 3, 0] and perms["P1"].tolist() == [3, 0, 2, 1]
    assert sweeps == 2  # the second sweep finds nothing to improve
    for name in a:
        assert torch.equal(apply_permutation(name, b[name], spec, perms), a[name])


def test_repair_one_linear_layer_vector():
    x = T([[1, 0], [0, 1], [1, 1], [-1, 2], [2, -1], [0.5, 0.5]])
    features = torch.cat([torch.zeros(1, 2), x])

    def layer(w, b):
        model = FeatureModel(features, torch.as_tensor(w, dtype=torch.float32))
        model.proj = torch.nn.Linear(2, 3)
        with torch.no_grad():
            model.proj.weight.copy_(torch.as_tensor(w))
            model.proj.bias.copy_(torch.as_tensor(b))
        return model

    wa, ba = [[1, 0.5], [-0.5, 1], [0.3, -0.8]], [0.1, 0, -0.2]
    wb, bb = [[0.2, 1], [1, -0.3], [-0.6, 0.4]], [0, 0.3, 0.1]
    a, b = layer(wa, ba), layer(wb, bb)
    merged = layer((T(wa) + T(wb)) / 2, (T(ba) + T(bb)) / 2)
    ids = torch.arange(1, 7)[None]
    mask = torch.ones_like(ids)
    tokens = TokenBatch(ids, mask, mask.bool())
    point = RepairPoint(
        "proj",
        "output",
        "affine",
        "proj.weight",
        lambda s, sh: {"proj.weight": Fold(0, s), "proj.bias": Fold(0, s, sh)},
    )
    folds = repair_folds(merged, a, b, tokens, [point], lambda name: 0.5, batch_size=8)
    assert torch.allclose(
        merged.proj.weight, T([[1.360612, 1.700765], [2.222526, 3.111536], [-1.810934, -2.414579]]), atol=1e-5
    )
    assert torch.allclose(merged.proj.bias, T([-0.948303, -2.611536, 2.210716]), atol=1e-5)
    interpolated = (T(wa) + T(wb)) / 2
    assert torch.allclose(folds["proj.weight"].apply(interpolated), merged.proj.weight)
    stats = unit_statistics(merged, tokens, [point], 8)["proj"]
    assert torch.allclose(stats.std.float(), T([0.649490, 1.283176, 0.961051]), atol=1e-5)
    assert torch.allclose(stats.mean.float(), T([0.837500, 0.500000, -0.254167]), atol=1e-5)


def test_composed_fold_equals_the_two_folds_in_turn():
    weight, bias = torch.randn(4, 3), torch.randn(3)
    first, later = Fold(0, T([2.0, 0.5, 1.0]), T([0.1, 0.0, -1.0])), Fold(0, T([1.0, 3.0, -1.0]), T([0.0, 2.0, 0.5]))
    assert torch.allclose(first.then(later).apply(bias), later.apply(first.apply(bias)))
    scale_only = Fold(1, T([2.0, 0.5, 1.0])).then(Fold(1, T([1.0, 3.0, -1.0])))
    assert scale_only.shift is None and torch.allclose(scale_only.apply(weight), weight * T([2.0, 1.5, -1.0]))


def test_rotary_pair_scale_commutes_with_rope_and_pair_rms_is_rotation_invariant():
    """Why Llama's q/k repair uses one scale per RoPE pair (i, i + head_dim/2): that scale commutes
    with the rotation, so it can be folded into q_proj/k_proj rows; a per-dimension scale cannot."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, positions, head_dim = 2, 5, 8
    q = torch.randn(1, heads, positions, head_dim)
    angle = torch.arange(positions)[:, None] * T([1.0, 0.3, 0.1, 0.03]).repeat(2)[None, :]
    cos, sin = angle.cos()[None], angle.sin()[None]
    rope = lambda x: apply_rotary_pos_emb(x, x, cos, sin)[0]  # noqa: E731
    pair_scale = T([2.0, 0.5, 1.5, 3.0]).repeat(2)
    assert torch.allclose(rope(q * pair_scale), rope(q) * pair_scale, atol=1e-6)
    dim_scale = T([2.0, 0.5, 1.5, 3.0, 1.0, 1.0, 1.0, 1.0])
    assert not torch.allclose(rope(q * dim_scale), rope(q) * dim_scale, atol=1e-3)
    rms = lambda x: x.square().mean(2).sqrt().reshape(-1)  # noqa: E731  per head and dimension, over positions
    assert torch.allclose(rotary_pair_rms(rms(rope(q)), head_dim), rotary_pair_rms(rms(q), head_dim), atol=1e-6)
