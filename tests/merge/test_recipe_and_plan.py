"""Recipe parsing, round-trips, gradients/filters and how the planner resolves parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fake_llama

from evomerge.errors import EvomergeError
from evomerge.merge.jobs import ModelCatalog
from evomerge.merge.plan import plan_merge
from evomerge.merge.recipe import (
    evaluate_setting,
    interpolate_gradient,
    load_recipe,
    loads_recipe,
    parse_recipe,
    register_recipe_block,
)
from evomerge.merge.validation import validate_recipe

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "data" / "mergekit_examples").glob("*.yml"))


def test_all_six_mergekit_examples_are_present():
    assert len(EXAMPLES) == 6, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_mergekit_examples_parse_validate_and_round_trip(path):
    from evomerge.merge.recipe import dump_recipe

    recipe = load_recipe(path)
    validate_recipe(recipe)  # model references aside: no file is opened
    again = loads_recipe(dump_recipe(recipe))
    assert again == recipe
    assert dump_recipe(again) == dump_recipe(recipe)


def test_round_trip_keeps_types_and_filters():
    text = """
merge_method: ties
base_model: b
models:
  - model: a
    parameters:
      weight: [{filter: mlp, value: [0, 1]}, {filter: '*', value: 1}]
      density: 1e-1
parameters: {normalize: false, lambda: 2}
seed: 3
"""
    from evomerge.merge.recipe import dump_recipe

    recipe = loads_recipe(text)
    assert recipe.parameters == {"normalize": False, "lambda": 2}
    assert loads_recipe(dump_recipe(recipe)) == recipe
    validate_recipe(recipe)  # "1e-1" (a YAML string) is accepted as a number


@pytest.mark.parametrize(
    "gradient,expected",
    [
        ([0, 0.5, 1], [0.0, 0.25, 0.5, 0.75, 1.0]),
        ([0, 1, 0.5], [0.0, 0.5, 1.0, 0.75, 0.5]),
        ([0.2, 0.8], [0.2, 0.35, 0.5, 0.65, 0.8]),
    ],
)
def test_gradient_vectors_five_layers(gradient, expected):
    values = [interpolate_gradient(gradient, i / 4) for i in range(5)]
    assert values == pytest.approx(expected, abs=1e-6)


def test_gradient_vector_32_layers():
    layers = [0, 1, 7, 8, 15, 16, 31]
    values = [interpolate_gradient([0, 0.5, 0.3, 0.7, 1], i / 31) for i in layers]
    assert values == pytest.approx([0.0, 0.064516, 0.451613, 0.493548, 0.312903, 0.325806, 1.0], abs=1e-6)


def test_filters_first_substring_match_wins():
    setting = loads_recipe("""
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t: [{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.9}, {value: 0.5}]
""").parameters["t"]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.9
    assert evaluate_setting(setting, "model.norm.weight", 0.25) == 0.5
    no_fallback = loads_recipe(
        "merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: [{filter: mlp, value: 1}]}"
    ).parameters["weight"]
    assert evaluate_setting(no_fallback, "model.norm.weight", 0) is None


@pytest.fixture(scope="module")
def five_layer(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    return {name: fake_llama(root / name, 5, seed=i) for i, name in enumerate(["base", "a", "b"])} | {
        "three": fake_llama(root / "three", 3, seed=9)
    }


def _plan(text, models, **kw):
    for name, path in models.items():
        text = text.replace(f"<{name}>", str(path))
    return plan_merge(loads_recipe(text), ModelCatalog(), **kw)


def test_plan_resolves_gradients_per_layer_and_precedence(five_layer):
    plan = _plan(
        """
merge_method: ties
base_model: <base>
models:
  - model: <a>
    parameters: {weight: 1.0, density: [0, 0.5, 1]}
  - model: <b>
parameters:
  weight: [{filter: mlp, value: 0.25}, {value: 0.75}]
  density: 0.9
  normalize: false
""",
        five_layer,
    )
    q = {j.layer: j for j in plan.jobs if j.name.endswith("q_proj.weight")}
    assert [q[i].input_params[0]["density"] for i in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert [q[i].input_params[1]["density"] for i in range(5)] == [0.9] * 5  # top-level fallback
    down = next(j for j in plan.jobs if j.name == "model.layers.2.mlp.down_proj.weight")
    assert down.input_params[1]["weight"] == 0.25 and down.input_params[0]["weight"] == 1.0
    assert q[0].input_params[1]["weight"] == 0.75
    assert q[0].params["normalize"] is False and q[0].params["lambda"] == 1.0
    # embeddings and the final norm / lm_head take the gradient's first value (t = 0), like mergekit
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert next(j for j in plan.jobs if j.name == name).input_params[0]["density"] == 0.0
    assert plan.jobs[0].base.model == 0 and len(plan.jobs[0].inputs) == 2


def test_plan_slices_stack_layers_and_rewrite_config(five_layer):
    plan = _plan(
        """
merge_method: passthrough
slices:
  - sources: [{model: <a>, layer_range: [0, 2]}]
  - sources: [{model: <b>, layer_range: [1, 3]}]
  - sources:
      - model: <a>
        layer_range: [2, 5]
        parameters: {scale: [{filter: down_proj, value: 0.5}]}
""",
        five_layer,
    )
    assert plan.layer_sources == [(0, 0), (0, 1), (1, 1), (1, 2), (0, 2), (0, 3), (0, 4)]
    assert plan.out_config["num_hidden_layers"] == 7
    by_name = {j.name: j for j in plan.jobs}
    assert by_name["model.layers.2.self_attn.q_proj.weight"].inputs[0].name == "model.layers.1.self_attn.q_proj.weight"
    assert by_name["model.layers.6.mlp.down_proj.weight"].input_params[0]["scale"] == 0.5
    assert by_name["model.layers.6.self_attn.q_proj.weight"].input_params[0]["scale"] is None
    assert by_name["model.embed_tokens.weight"].inputs[0].model == 0  # first slice
    assert by_name["lm_head.weight"].inputs[0].model == 0  # last slice's source


def test_single_layer_slice_uses_t_equal_one(five_layer):
    plan = _plan(
        """
merge_method: slerp
base_model: <base>
slices:
  - sources: [{model: <base>, layer_range: [0, 1]}, {model: <a>, layer_range: [0, 1]}]
parameters: {t: [0.2, 0.8]}
""",
        five_layer,
    )
    layer0 = [j for j in plan.jobs if j.layer == 0]
    assert all(j.params["t"] == pytest.approx(0.8) for j in layer0)
    assert plan.jobs[0].params["t"] == pytest.approx(0.2)


def test_plan_cache_replans_only_parameters_and_equals_plan_merge(five_layer):
    """A search plans many recipes of one structure: the cached plan must be plan_merge's, values,
    gradients, filters, slices and seeds included, and bad values must still fail by field."""
    from evomerge.merge.plan import PlanCache

    def text(density, weight, scale):
        return f"""
merge_method: dare_ties
base_model: <base>
slices:
  - sources:
      - {{model: <base>, layer_range: [0, 3]}}
      - {{model: <a>, layer_range: [0, 3], parameters: {{weight: {weight}, density: {density}}}}}
      - {{model: <b>, layer_range: [2, 5], parameters: {{weight: 0.5, density: 0.5}}}}
    parameters: {{lambda: {scale}}}
  - sources:
      - {{model: <base>, layer_range: [3, 5]}}
      - {{model: <a>, layer_range: [3, 5], parameters: {{weight: 1.0, density: [{density}, 0.9]}}}}
parameters:
  density: 0.8
  weight: [{{filter: mlp, value: {weight}}}, {{value: 0.3}}]
"""

    def recipe(*values):
        body = text(*values)
        for name, path in five_layer.items():
            body = body.replace(f"<{name}>", str(path))
        return loads_recipe(body)

    cache = PlanCache(ModelCatalog())
    cache.plan(recipe(0.4, 0.7, 1.0), seed=1)
    for values, seed in [((0.2, 1.3, 0.9), 5), ((1.0, 0.0, 1.1), None), ((0.4, 0.7, 1.0), 1)]:
        cached, fresh = cache.plan(recipe(*values), seed=seed), plan_merge(recipe(*values), ModelCatalog(), seed=seed)
        assert cached.jobs == fresh.jobs and cached.seed == fresh.seed and cached.recipe == fresh.recipe
        assert cached.out_config == fresh.out_config and cached.layer_sources == fresh.layer_sources
    assert len(cache._templates) == 1
    with pytest.raises(EvomergeError, match="density"):
        cache.plan(recipe(1.5, 0.7, 1.0))


def test_extension_blocks_plug_in():
    from pydantic import BaseModel

    class Calibration(BaseModel):
        dataset: str
        samples: int = 8

    register_recipe_block("calibration_test", Calibration)
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": "a", "parameters": {"weight": 1}}],
            "calibration_test": {"dataset": "x"},
        }
    )
    assert recipe.model_extra["calibration_test"] == Calibration(dataset="x")
    from evomerge.merge.recipe import dump_recipe

    assert "samples: 8" in dump_recipe(recipe) and loads_recipe(dump_recipe(recipe)) == recipe
    with pytest.raises(EvomergeError, match="calibration_tset: unknown top-level key"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}], "calibration_tset": {}})
