"""Deterministic methods give mergekit 0.1.5's numbers (max |diff| <= 1e-5, fp32) on the same
checkpoints and recipe. mergekit runs in-process through its Python API (`run_merge`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.runner import merge_from_file

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e .[test])")
pytestmark = [pytest.mark.mergekit, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOLERANCE = 1e-5


def run_mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def compare(tmp_path: Path, recipe: dict, *, ours_extra: dict | None = None) -> float:
    """Merge with both tools; return the max abs difference after checking names and shapes."""
    run_mergekit(json.loads(json.dumps(recipe)), tmp_path / "mergekit")
    ours_recipe = {**recipe, "parameters": {**(recipe.get("parameters") or {}), **(ours_extra or {})}}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(ours_recipe))
    merge_from_file(path, tmp_path / "evomerge", progress=False)
    theirs, ours = read_all(tmp_path / "mergekit"), read_all(tmp_path / "evomerge")
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].dtype == theirs[name].dtype, name
        worst = max(worst, (ours[name].double() - theirs[name].double()).abs().max().item())
    first = read_all(Path(recipe_first_model(recipe)))
    changed = max((ours[n].double() - first[n].double()).abs().max().item() for n in ours if n in first)
    assert changed > 100 * TOLERANCE, "the merge did not change anything; the comparison would be vacuous"
    print(f"{recipe['merge_method']}: max |evomerge - mergekit| = {worst:.3g}")
    config_ours = json.loads((tmp_path / "evomerge" / "config.json").read_text())
    config_theirs = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert config_ours["num_hidden_layers"] == config_theirs["num_hidden_layers"]
    return worst


def recipe_first_model(recipe: dict) -> str:
    if recipe.get("models"):
        return recipe["models"][0]["model"]
    return recipe["slices"][0]["sources"][0]["model"]


def _models(zoo, names, params):
    return [{"model": str(zoo[n]), "parameters": p} for n, p in zip(names, params, strict=True)]


def test_linear(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": _models(
            llama_zoo,
            ["ft1", "ft2", "ft3"],
            [{"weight": 1.0}, {"weight": [0.3, 0.9]}, {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]}],
        ),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_linear_unnormalized(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "models": _models(llama_zoo, ["ft1", "ft2"], [{"weight": 0.7}, {"weight": -0.2}]),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_linear_merges_an_unlisted_base_model_as_an_input(tmp_path, llama_zoo):
    """mergekit adds a base_model missing from models: to the inputs; the top-level weight is its."""
    recipe = {
        "merge_method": "linear",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"weight": 2.0},
        "models": _models(llama_zoo, ["ft1", "ft2"], [{"weight": 1.0}, {"weight": 0.5}]),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE
    with_base = read_all(tmp_path / "evomerge")
    recipe.pop("base_model")
    merge_from_file(_write(tmp_path / "nobase.yml", recipe), tmp_path / "nobase", progress=False)
    other = read_all(tmp_path / "nobase")
    assert max((other[n] - with_base[n]).abs().max().item() for n in other) > 1e-3


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_slerp_with_filtered_gradients(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(llama_zoo["ft1"]),
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": str(llama_zoo["ft1"]), "layer_range": [0, 4]},
                    {"model": str(llama_zoo["ft2"]), "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_task_arithmetic_negation_and_lambda(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"lambda": 0.8},
        "models": _models(llama_zoo, ["ft1", "ft2"], [{"weight": 1.0}, {"weight": -0.5}]),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_ties_gradients_filters(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llama_zoo["base"]),
        "dtype": "float32",
        "parameters": {"normalize": True, "int8_mask": True},
        "models": _models(
            llama_zoo,
            ["ft1", "ft2", "ft3"],
            [
                {"density": [1, 0.7, 0.1], "weight": 1.0},
                {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
                {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
            ],
        ),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_ties_unnormalized_with_lambda(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"normalize": False, "lambda": 1.3},
        "models": _models(
            llama_zoo, ["ft1", "ft2"], [{"density": 0.2, "weight": 0.6}, {"density": 0.9, "weight": 0.4}]
        ),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(tmp_path, llama_zoo, method):
    recipe = {
        "merge_method": method,
        "base_model": str(llama_zoo["base"]),
        "models": _models(
            llama_zoo,
            ["ft1", "ft2"],
            [{"density": 0.6, "gamma": 0.05, "weight": 1.0}, {"density": 0.4, "gamma": 0.0001, "weight": 0.5}],
        ),
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_defaults_are_mergekits(tmp_path, llama_zoo, filter_wise):
    """The same recipe, no evomerge-only keys: mergekit's unclamped ratio is the default."""
    recipe = {
        "merge_method": "model_stock",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"filter_wise": filter_wise},
        "models": [{"model": str(llama_zoo[n])} for n in ("ft1", "ft2", "ft3")],
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_model_stock_clamp_is_opt_in_and_changes_the_merge(tmp_path, llama_zoo):
    """The zoo's fine-tunes are independent noise (cos ~ 0, often < 0), so clamping t matters."""
    recipe = {
        "merge_method": "model_stock",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"filter_wise": True},
        "models": [{"model": str(llama_zoo[n])} for n in ("ft1", "ft2", "ft3")],
    }
    assert compare(tmp_path, recipe, ours_extra={"clamp_t": True}) > 1e-3


def test_passthrough_stack_with_scale(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(llama_zoo["ft1"]), "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": str(llama_zoo["ft2"]),
                        "layer_range": [1, 4],
                        "parameters": {"scale": [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}]},
                    }
                ]
            },
        ],
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_arcee_fusion(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "arcee_fusion",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo["base"])}, {"model": str(llama_zoo["ft1"])}],
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_gpt2_ties(tmp_path, gpt2_zoo):
    recipe = {
        "merge_method": "ties",
        "base_model": str(gpt2_zoo["base"]),
        "models": _models(gpt2_zoo, ["ft1", "ft2"], [{"density": 0.3, "weight": 1.0}, {"density": 0.6, "weight": 0.5}]),
    }
    run_mergekit(json.loads(json.dumps(recipe)), tmp_path / "mergekit")
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    merge_from_file(path, tmp_path / "evomerge", progress=False)
    theirs, ours = read_all(tmp_path / "mergekit"), read_all(tmp_path / "evomerge")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= TOLERANCE


# -- the methods added for mergekit 0.1.5 parity (issue #16) ---------------------------------------------


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce(tmp_path, llama_zoo, select_topk):
    recipe = {
        "merge_method": "sce",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"select_topk": select_topk},
        "models": [{"model": str(llama_zoo[n])} for n in ("ft1", "ft2", "ft3")],
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize(
    "with_base,parameters",
    [
        (False, {}),
        (False, {"nuslerp_flatten": False}),
        (True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        (True, {}),
    ],
)
def test_nuslerp(tmp_path, llama_zoo, with_base, parameters):
    recipe = {
        "merge_method": "nuslerp",
        "parameters": parameters,
        "models": _models(llama_zoo, ["ft1", "ft2"], [{"weight": [0.2, 0.8]}, {"weight": 0.6}]),
    }
    if with_base:
        recipe["base_model"] = str(llama_zoo["base"])
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize("with_base,normalize", [(False, True), (True, True), (True, False)])
def test_multislerp(tmp_path, llama_zoo, with_base, normalize):
    recipe = {
        "merge_method": "multislerp",
        "parameters": {"normalize_weights": normalize},
        "models": _models(
            llama_zoo,
            ["ft1", "ft2", "ft3"],
            [{"weight": 1.0}, {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}]}, {"weight": 0.3}],
        ),
    }
    if with_base:
        recipe["base_model"] = str(llama_zoo["base"])
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize(
    "with_base,parameters", [(False, {"max_iter": 20, "tol": 1e-6}), (True, {}), (True, {"max_iter": 1})]
)
def test_karcher(tmp_path, llama_zoo, with_base, parameters):
    """A base_model missing from models: is one more input in both tools."""
    recipe = {
        "merge_method": "karcher",
        "parameters": parameters,
        "models": [{"model": str(llama_zoo[n])} for n in ("ft1", "ft2", "ft3")],
    }
    if with_base:
        recipe["base_model"] = str(llama_zoo["base"])
    assert compare(tmp_path, recipe) <= TOLERANCE


def test_karcher_counts_the_base_as_an_input(tmp_path, llama_zoo):
    models = [{"model": str(llama_zoo[n])} for n in ("ft1", "ft2")]
    with_base = {"merge_method": "karcher", "base_model": str(llama_zoo["base"]), "models": models}
    listed = {"merge_method": "karcher", "models": [*models, {"model": str(llama_zoo["base"])}]}
    for name, recipe in (("implicit", with_base), ("listed", listed)):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe))
        merge_from_file(path, tmp_path / name, progress=False)
    implicit, explicit = read_all(tmp_path / "implicit"), read_all(tmp_path / "listed")
    assert all(torch.equal(implicit[n], explicit[n]) for n in implicit)


def test_nearswap(tmp_path, llama_zoo):
    recipe = {
        "merge_method": "nearswap",
        "base_model": str(llama_zoo["base"]),
        "parameters": {"t": [0.001, 0.05]},
        "models": [{"model": str(llama_zoo["ft1"])}],
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize(
    "method,parameters",
    [
        ("ram", {}),
        ("ram", {"epsilon": 0.02}),
        ("ramplus_tl", {}),
        ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 1.5}),
    ],
)
def test_ram(tmp_path, llama_zoo, method, parameters):
    recipe = {
        "merge_method": method,
        "base_model": str(llama_zoo["base"]),
        "parameters": parameters,
        "models": [{"model": str(llama_zoo[n])} for n in ("ft1", "ft2", "ft3")],
    }
    assert compare(tmp_path, recipe) <= TOLERANCE


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_dare_and_della_default_rescaling_is_mergekits(tmp_path, llama_zoo, method):
    """Masks are random in both tools, but the default rescaling is the same: mergekit matches each
    sparsified task vector's L1 norm to the original's, so with one model at weight 1 every
    tensor's |merged - base|_1 equals |ft - base|_1 in both, whatever the mask. The papers'
    1/keep-probability rescaling (`rescale_norm: inverse`, opt-in) does not keep it."""
    recipe = {
        "merge_method": method,
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    run_mergekit(json.loads(json.dumps(recipe)), tmp_path / "mergekit")
    merge_from_file(_write(tmp_path / "ours.yml", recipe), tmp_path / "ours", progress=False)
    inverse = {**recipe, "parameters": {"rescale_norm": "inverse"}}
    merge_from_file(_write(tmp_path / "inverse.yml", inverse), tmp_path / "inverse", progress=False)
    base, ft = read_all(llama_zoo["base"]), read_all(llama_zoo["ft1"])
    theirs, ours, unbiased = (read_all(tmp_path / d) for d in ("mergekit", "ours", "inverse"))

    def l1_error(merged: dict[str, torch.Tensor], name: str) -> float:
        target = (ft[name] - base[name]).double().abs().sum()
        return float(((merged[name] - base[name]).double().abs().sum() - target).abs() / target)

    names = [n for n in base if n.endswith("proj.weight")]
    assert max(l1_error(theirs, n) for n in names) < 1e-4
    assert max(l1_error(ours, n) for n in names) < 1e-4
    assert max(l1_error(unbiased, n) for n in names) > 1e-3
    assert any(not torch.equal(ours[n] == base[n], theirs[n] == base[n]) for n in names)  # masks differ
