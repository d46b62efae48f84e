"""NaN and inf: refused as recipe values (naming the field), and a merged tensor holding them stops
the merge naming the tensor, unless --allow-nonfinite; nothing is written on refusal."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_errors import GOOD, _assert_clean_failure, _run


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda t: t.replace("weight: 0.5", "weight: .nan"), "models[1].parameters.weight: must be a finite number"),
        (lambda t: t.replace("weight: 1.0", "weight: .inf"), "models[0].parameters.weight: must be a finite number"),
        (
            lambda t: t.replace("density: 0.7", "density: [0.2, -.inf]"),
            "models[1].parameters.density: must be a finite",
        ),
    ],
)
def test_nonfinite_recipe_values_are_refused(edit, fragment, tmp_path, llama_zoo):
    result, out = _run(tmp_path, llama_zoo, edit(GOOD))
    _assert_clean_failure(result, out, fragment)


def test_a_source_with_nan_stops_the_merge_naming_the_tensor(tmp_path, llama_zoo):
    broken = tmp_path / "ft2"
    shutil.copytree(llama_zoo["ft2"], broken)
    state = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][3, 4] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    zoo = {**llama_zoo, "ft2": broken}
    result, out = _run(tmp_path, zoo, GOOD)
    _assert_clean_failure(result, out, f"{name}: the merged tensor holds NaN or inf", "--allow-nonfinite")
    result, out = _run(tmp_path, zoo, GOOD, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert torch.isnan(load_file(out / "model.safetensors")[name]).any()


@pytest.mark.parametrize("kernels", ["auto", "compiled"])  # the flat pass; the kernel's own check
def test_a_nan_candidate_in_memory_is_refused_naming_the_tensor(tmp_path, llama_zoo, kernels):
    from evomerge.candidates.materialize import Materializer
    from evomerge.errors import EvomergeError

    broken = tmp_path / "ft1"
    shutil.copytree(llama_zoo["ft1"], broken)
    state = load_file(broken / "model.safetensors")
    state["model.norm.weight"][0] = float("inf")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    materializer = Materializer([llama_zoo["base"], broken], kernels=kernels)
    recipe = {
        "merge_method": "ties",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(broken), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    with pytest.raises(EvomergeError, match=r"model.norm.weight: the merged tensor holds NaN or inf"):
        materializer.apply(recipe)
    assert (materializer.fused.fused_jobs > 0) == (kernels == "compiled")
