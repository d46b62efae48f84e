"""DARE / DELLA: seeded determinism, order independence, kept fraction and unbiasedness."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evomerge.merge.jobs import ModelCatalog
from evomerge.merge.methods import make_generator
from evomerge.merge.methods.sparsify import bernoulli_drop, della_keep_probabilities, della_magprune
from evomerge.merge.plan import plan_merge
from evomerge.merge.recipe import loads_recipe
from evomerge.merge.runner import CheckpointSource, compute_tensor, merge_from_file

N = 1_000_000


def _recipe(zoo, method: str, seed_line: str = "") -> str:
    extra = ", epsilon: 0.1" if method.startswith("della") else ""
    return f"""
merge_method: {method}
base_model: {zoo["base"]}
models:
  - model: {zoo["ft1"]}
    parameters: {{weight: 0.7, density: 0.4{extra}}}
  - model: {zoo["ft2"]}
    parameters: {{weight: 0.5, density: 0.6{extra}}}
{seed_line}"""


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_same_seed_same_bytes_different_seed_differs(tmp_path, llama_zoo, method):
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe(llama_zoo, method))
    outputs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge_from_file(recipe, tmp_path / name, seed=seed, progress=False)
        outputs[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]


def test_recipe_seed_is_used_and_cli_seed_overrides(tmp_path, llama_zoo):
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe(llama_zoo, "dare_ties", "seed: 5"))
    merge_from_file(recipe, tmp_path / "from_recipe", progress=False)
    merge_from_file(recipe, tmp_path / "from_cli", seed=5, progress=False)
    merge_from_file(recipe, tmp_path / "other", seed=6, progress=False)
    same = (tmp_path / "from_recipe" / "model.safetensors").read_bytes()
    assert same == (tmp_path / "from_cli" / "model.safetensors").read_bytes()
    assert same != (tmp_path / "other" / "model.safetensors").read_bytes()
    assert "seed: 6" in (tmp_path / "other" / "mergekit_config.yml").read_text()


def test_masks_do_not_depend_on_execution_order(llama_zoo):
    plan = plan_merge(loads_recipe(_recipe(llama_zoo, "della")), ModelCatalog(), seed=3)
    source = CheckpointSource(plan)
    forward = {job.name: compute_tensor(plan, job, source) for job in plan.jobs}
    backward = {job.name: compute_tensor(plan, job, source) for job in reversed(plan.jobs)}
    assert all(torch.equal(forward[name], backward[name]) for name in forward)
    lone = plan.jobs[17]
    assert torch.equal(compute_tensor(plan, lone, source), forward[lone.name])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_within_one_percent(density):
    delta = torch.randn(N, generator=torch.Generator().manual_seed(0))
    kept = bernoulli_drop(delta, density, make_generator(0, 0, "w"), rescale=False).ne(0).float().mean().item()
    assert abs(kept - density) <= 0.01 * density


@pytest.mark.parametrize("density,epsilon", [(0.2, 0.1), (0.5, 0.15), (0.8, 0.15)])
def test_della_kept_fraction_within_one_percent(density, epsilon):
    delta = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(1))
    out = della_magprune(delta, density, epsilon, make_generator(0, 0, "w"), rescale=False)
    assert abs(out.ne(0).float().mean().item() - density) <= 0.01 * density
    # larger magnitudes survive more often
    big = delta.abs() > delta.abs().median()
    assert out.ne(0)[big].float().mean() > out.ne(0)[~big].float().mean() + epsilon / 2


def _z_score(samples: torch.Tensor, expected: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """z of the sum of deviations: ~N(0, 1) when the estimator is unbiased."""
    return (samples - expected).sum() / variance.sum().sqrt()


def test_dare_rescale_preserves_the_expectation():
    density = 0.3
    delta = torch.randn(N, generator=torch.Generator().manual_seed(2)).double() + 0.5
    dropped = bernoulli_drop(delta, density, make_generator(1, 0, "w"), rescale=True)
    variance = delta**2 * (1 - density) / density  # per-entry variance of keep/density * delta
    z = _z_score(dropped, delta, variance)
    assert abs(z) < 5
    # the same statistic rejects an estimator without rescaling by a wide margin
    unscaled = bernoulli_drop(delta, density, make_generator(1, 0, "w"), rescale=False)
    assert abs(_z_score(unscaled, delta, variance)) > 100


def test_della_rescale_preserves_the_expectation_per_entry():
    delta = torch.tensor([[0.3, -0.1, 0.2, 0.05, -0.6, 1.0]], dtype=torch.float64)
    probs = della_keep_probabilities(delta, 0.5, 0.2)
    draws = 4000
    total = torch.zeros_like(delta)
    for i in range(draws):
        total += della_magprune(delta, 0.5, 0.2, make_generator(i, 0, "w"), rescale=True)
    mean = total / draws
    std_error = delta.abs() * torch.sqrt((1 - probs) / probs / draws)
    z = (mean - delta) / std_error
    assert z.abs().max() < 4.5
    assert math.isclose(probs.mean().item(), 0.5, abs_tol=1e-12)


def test_seed_changes_only_random_methods(tmp_path: Path, llama_zoo):
    text = f"""
merge_method: ties
base_model: {llama_zoo["base"]}
models: [{{model: {llama_zoo["ft1"]}, parameters: {{weight: 1, density: 0.5}}}}]
"""
    recipe = tmp_path / "t.yml"
    recipe.write_text(text)
    merge_from_file(recipe, tmp_path / "a", seed=1, progress=False)
    merge_from_file(recipe, tmp_path / "b", seed=2, progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert "seed" not in (tmp_path / "a" / "mergekit_config.yml").read_text()


def test_keep_indicator_equals_strict_comparison():
    from evomerge.merge.methods.sparsify import keep_indicator

    g = torch.Generator().manual_seed(3)
    uniform = torch.rand(200_000, generator=g)
    uniform[:4] = torch.tensor([0.0, 0.3, torch.nextafter(torch.tensor(0.3), torch.tensor(0.0)).item(), 0.9999999])
    for probs in (0.3, torch.rand(200_000, generator=g), 0.0, 1.0):
        expected = (uniform < probs).float()
        assert torch.equal(keep_indicator(uniform.clone(), probs), expected)
