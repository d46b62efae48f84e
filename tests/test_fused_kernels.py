"""The compiled one-pass kernels (evaluation/fused.py) give the eager methods' bits.

Compiling costs seconds per method shape, so the default run compiles two shapes that between
them cover the tie rule of the top-k cut, a recipe `dtype` (rounding Inductor must not skip), the
cached mask draws and sign election; the slow run covers every fused method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_materialize import SEED, assert_same_state, file_merge, ps_recipes

from evomerge.candidates.fused import DrawStore, _kernel, _topk_cut, kernel_mode
from evomerge.candidates.materialize import Materializer
from evomerge.merge.methods.base import make_generator
from evomerge.merge.methods.sparsify import magnitude_topk, stable_row_ranks, topk_count, uniform_like


def assert_fused_equals_file_merge(zoo: Path, tmp_path: Path, labels: list[str], extra: dict | None = None) -> None:
    materializer = Materializer([zoo / n for n in ("base", "add", "rev", "shift")], kernels="compiled")
    recipes = ps_recipes(zoo) | (extra or {})
    for label in labels:
        before = materializer.fused.eager_jobs
        candidate = materializer.apply(recipes[label], seed=SEED)
        written = load_file(
            str(file_merge(recipes[label], tmp_path / label.replace("@", "-"), seed=SEED) / "model.safetensors")
        )
        assert_same_state(candidate.model, written, label)
        if not label.endswith("@eager-fallback"):
            assert materializer.fused.eager_jobs == before, f"{label}: some jobs did not use the kernel"
    assert materializer.fused.fused_jobs > 0


def test_compiled_kernels_equal_the_file_merge_bit_for_bit(mini_zoo: Path, tmp_path: Path) -> None:
    assert_fused_equals_file_merge(mini_zoo, tmp_path, ["ties@bf16-inputs", "dare_ties", "dare_ties@l1", "della@l1"])


@pytest.mark.slow
def test_every_fused_method_equals_the_file_merge_bit_for_bit(mini_zoo: Path, tmp_path: Path) -> None:
    base, add, rev = (str(mini_zoo / n) for n in ("base", "add", "rev"))
    extra = {
        "task_arithmetic@normalize": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"normalize": True},
            "models": [{"model": add, "parameters": {"weight": 0.7}}, {"model": rev, "parameters": {"weight": 0.2}}],
        },
        "ties@count": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"consensus": "count"},
            "models": [
                {"model": add, "parameters": {"weight": 1.0, "density": 0.3}},
                {"model": rev, "parameters": {"weight": 0.6, "density": 1.0}},
            ],
        },
        "della_linear@no-rescale": {
            "merge_method": "della_linear",
            "base_model": base,
            "parameters": {"rescale": False, "lambda": 1.3},
            "models": [{"model": add, "parameters": {"weight": 0.9, "density": 0.4}}],
        },
        "dare_ties@one-input-l1": {
            "merge_method": "dare_ties",
            "base_model": base,
            "parameters": {"rescale_norm": "l1"},
            "models": [{"model": add, "parameters": {"weight": 0.9, "density": 0.4}}],
        },
    }
    labels = ["task_arithmetic", "ties", "dare_linear", "della", "della_linear", "della@bf16", "dare_linear@l1", *extra]
    assert_fused_equals_file_merge(mini_zoo, tmp_path, labels, extra)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.77, 1.0])
def test_the_topk_cut_keeps_what_the_eager_top_k_keeps_with_many_ties(density: float) -> None:
    delta = torch.randint(-4, 5, (37, 29)).float() / 8  # nine magnitudes: every cut falls inside a tie
    values, order = delta.abs().reshape(-1).sort(stable=True)
    cut, tied, value, start = _topk_cut(values, order.to(torch.int32), density)
    kept = delta.abs() >= cut
    if tied is not None:
        kept.view(-1)[tied] = True
    index = torch.arange(delta.numel()).view(delta.shape)  # the index form (magnitude_index) keeps the same
    assert torch.equal(kept, (delta.abs() > value) | ((delta.abs() == value) & (index >= start)))
    expected = magnitude_topk(delta.clone(), density) != 0
    nonzero = delta != 0  # zero entries are "kept" or not without changing the merge
    assert torch.equal(kept & nonzero, expected)
    assert int(kept.sum()) == max(1, int(density * delta.numel()))


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.77, 1.0])
def test_the_rank_cut_of_the_flat_path_keeps_what_the_eager_top_k_keeps_with_many_ties(density: float) -> None:
    """flat.py keeps an entry when its stable rank is at least n - k: exact with equal magnitudes."""
    delta = torch.randint(-4, 5, (37, 29)).float() / 8
    n = delta.numel()
    ranks = stable_row_ranks(delta.abs().reshape(-1)).to(torch.float32)
    cut = -1.0 if density >= 1 else float(n - topk_count(density, n) - 1)
    scalars = torch.tensor([cut, 0.0, 0.7, 0.7, 1.0, 1.0])  # one input: cut, slope, factor, weight, lambda, divisor
    out = torch.empty(n)
    _kernel(
        out, torch.zeros(n), [delta.reshape(-1)], [], [ranks], scalars, "rank", None, False, False, False, False, None
    )
    expected = magnitude_topk(delta.clone(), density, scale=0.7) if density < 1 else delta * 0.7
    assert torch.equal(out, expected.reshape(-1))


def test_the_draw_store_returns_the_generator_draws_and_stays_within_its_budget() -> None:
    """Within one candidate nothing in use is evicted (a cyclic scan would thrash an LRU): a draw
    that does not fit is returned uncached; entries idle for a whole candidate make room."""
    like = torch.zeros(100, 10)
    store = DrawStore(max_bytes=2 * like.numel() * 4)
    generators = [make_generator(3, i, "w") for i in range(3)]
    draws = [store.get(g, like) for g in generators]
    for generator, drawn in zip(generators, draws, strict=True):
        assert torch.equal(drawn, uniform_like(like, make_generator(3, generators.index(generator), "w")))
    assert store.nbytes == 2 * like.numel() * 4  # the third did not fit
    assert store.get(make_generator(3, 1, "w"), like) is draws[1]  # still cached
    assert store.get(make_generator(3, 2, "w"), like) is not draws[2]  # drawn again, equal
    assert not torch.equal(draws[0], draws[1])
    store.cache.tick()
    store.cache.tick()
    assert store.get(make_generator(3, 1, "w"), like) is draws[1]  # used in this candidate
    kept = store.get(make_generator(3, 2, "w"), like)  # evicts draws[0], idle for a candidate
    assert store.get(make_generator(3, 2, "w"), like) is kept
    assert store.nbytes == 2 * like.numel() * 4


def test_an_unknown_kernel_mode_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOMERGE_KERNELS", "fast")
    with pytest.raises(ValueError, match="EVOMERGE_KERNELS"):
        kernel_mode()
    assert kernel_mode("eager") == "eager"
