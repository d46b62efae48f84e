"""Bad recipes fail fast with one line that names the field, exit non-zero, and leave no output."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli.app import app

GOOD = """
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: ft2
    parameters: {weight: 0.5, density: 0.7}
"""


def _run(tmp_path: Path, zoo: dict[str, Path], text: str, *extra: str):
    for name, path in zoo.items():
        text = text.replace(f"model: {name}\n", f"model: {path}\n").replace(
            f"base_model: {name}\n", f"base_model: {path}\n"
        )
        text = text.replace(f"model: {name},", f"model: {path},")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--quiet", *extra])
    return result, out


def _assert_clean_failure(result, out: Path, *fragments: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (lambda t: t.replace("merge_method: ties", "merge_method: tie"), ["merge_method", "'tie'", "ties"]),
        (lambda t: t.replace("density: 0.5", "denisty: 0.5"), ["models[0].parameters.denisty", "unknown parameter"]),
        (lambda t: t.replace("weight: 0.5, ", ""), ["models[1].parameters.weight", "required"]),
        (lambda t: t.replace("density: 0.7", "density: 1.5"), ["models[1].parameters.density", "<= 1", "1.5"]),
        (lambda t: t.replace("density: 0.7", "density: [0.2, -0.1]"), ["models[1].parameters.density", "-0.1"]),
        (lambda t: t.replace("base_model: base\n", ""), ["base_model", "ties needs a base model"]),
        (lambda t: t.replace("model: ft2\n", "model: /nonexistent/ft9\n"), ["models[1].model", "not found"]),
        (lambda t: t + "parameters: {normalize: maybe}\n", ["parameters.normalize", "true or false"]),
        (
            lambda t: t.replace("density: 0.5}", "density: 0.5, normalize: true}"),
            ["models[0].parameters.normalize", "global parameter"],
        ),
        (lambda t: t + "tokenizer_source: union\n", ["tokenizer_source", "cannot load the tokenizer"]),
        (
            lambda t: t + "tokenizer_source: base\ntokenizer: {source: union}\n",
            ["tokenizer_source", "either tokenizer_source: or a tokenizer: block"],
        ),
        (lambda t: t + "tokenizer: {source: union, pad_to_multiple_of: 0}\n", ["tokenizer.pad_to_multiple_of"]),
        (lambda t: t + "tokenizer: {tokens: {x: {sorce: base}}}\n", ["tokenizer.tokens.x.sorce", "unknown key"]),
        (lambda t: t + "dtype: float17\n", ["dtype", "float17"]),
        (lambda t: t.replace("models:", "modelz:"), ["modelz"]),
    ],
)
def test_recipe_errors(tmp_path, llama_zoo, edit, fragments):
    result, out = _run(tmp_path, llama_zoo, edit(GOOD))
    _assert_clean_failure(result, out, *fragments)


NUSLERP = """
merge_method: nuslerp
models:
  - model: ft1
    parameters: {weight: 1.0}
  - model: ft2
    parameters: {weight: 0.5}
"""


@pytest.mark.parametrize(
    "text,fragments",
    [
        (NUSLERP + "  - model: ft3\n    parameters: {weight: 1}\n", ["models", "nuslerp takes exactly 2", "got 3"]),
        (NUSLERP.replace("weight: 0.5", "wieght: 0.5"), ["models[1].parameters.wieght", "unknown parameter"]),
        (NUSLERP.replace("weight: 0.5", "weight: -1.0").replace("nuslerp", "multislerp"), ["weight", "sum to 0"]),
        (NUSLERP + "parameters: {nuslerp_flatten: 2}\n", ["parameters.nuslerp_flatten", "true or false"]),
        ("merge_method: nearswap\nbase_model: base\nmodels:\n  - model: ft1\n", ["parameters.t", "required"]),
        (
            "merge_method: karcher\nparameters: {max_iter: 2.5}\nmodels:\n  - model: ft1\n  - model: ft2\n",
            ["parameters.max_iter", "whole number"],
        ),
        ("merge_method: sce\nmodels:\n  - model: ft1\n  - model: ft2\n", ["base_model", "sce needs a base"]),
        (
            "merge_method: sce\nbase_model: base\nparameters: {select_topk: 1.5}\nmodels:\n  - model: ft1\n",
            ["parameters.select_topk", "<= 1"],
        ),
        (
            "merge_method: ram\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1}\n",
            ["models[0].parameters.weight", "unknown parameter for ram"],
        ),
        (
            "merge_method: linear\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1}\n",
            ["base_model", "one more input", "no weight applies"],
        ),
        (
            "merge_method: passthrough\nbase_model: base\nmodels:\n  - model: ft1\n",
            ["base_model", "one more input", "at most 1"],
        ),
    ],
)
def test_new_method_recipe_errors(tmp_path, llama_zoo, text, fragments):
    result, out = _run(tmp_path, llama_zoo, text)
    _assert_clean_failure(result, out, *fragments)


def test_layer_range_outside_model(tmp_path, llama_zoo):
    text = """
merge_method: passthrough
slices:
  - sources: [{model: ft1, layer_range: [0, 3]}]
  - sources: [{model: ft2, layer_range: [2, 6]}]
"""
    result, out = _run(tmp_path, llama_zoo, text)
    _assert_clean_failure(result, out, "slices[1].sources[0].layer_range", "[2, 6]", "4 layers")


def test_slice_sources_of_different_lengths(tmp_path, llama_zoo):
    text = """
merge_method: linear
slices:
  - sources:
      - {model: ft1, layer_range: [0, 4], parameters: {weight: 1}}
      - {model: ft2, layer_range: [0, 3], parameters: {weight: 1}}
"""
    result, out = _run(tmp_path, llama_zoo, text)
    _assert_clean_failure(result, out, "slices[0].sources[1].layer_range", "3 layers", "4")


def test_models_of_different_depth_need_slices(tmp_path, llama_zoo):
    text = GOOD.replace("model: ft2\n", "model: deep\n")
    result, out = _run(tmp_path, llama_zoo, text)
    _assert_clean_failure(result, out, "models[1].model", "6 layers", "slices")


def test_errors_come_before_any_tensor_is_read(tmp_path, llama_zoo, monkeypatch):
    from evomerge.io import checkpoint

    def forbidden(self, name):
        raise AssertionError("tensor data read during validation")

    monkeypatch.setattr(checkpoint.CheckpointReader, "get", forbidden)
    start = time.perf_counter()
    result, out = _run(tmp_path, llama_zoo, GOOD.replace("density: 0.7", "density: 2"))
    assert time.perf_counter() - start < 1.0
    _assert_clean_failure(result, out, "density")
    # a missing tensor in one input is found while planning (headers only), too
    result, out = _run(tmp_path, llama_zoo, GOOD, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "model.embed_tokens.weight" in result.output and "density=0.5" in result.output


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, llama_zoo):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result, out = _run(tmp_path, llama_zoo, GOOD)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result, out = _run(tmp_path, llama_zoo, GOOD, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_real_process_exit_status_and_stderr(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: ties\nbase_model: x\nmodels: [{model: y, parameters: {weight: 1}}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli.app", "merge", str(recipe), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: base_model: model 'x' not found")
    assert not (tmp_path / "o").exists()


def test_overwrite_never_replaces_an_input_model(tmp_path, llama_zoo):
    import shutil

    zoo = {name: shutil.copytree(path, tmp_path / "models" / name) for name, path in llama_zoo.items()}
    before = (zoo["ft1"] / "model.safetensors").read_bytes()
    for out in (zoo["ft1"], zoo["ft1"].parent):
        recipe = tmp_path / "recipe.yml"
        recipe.write_text(
            GOOD.replace("model: ft1\n", f"model: {zoo['ft1']}\n")
            .replace("model: ft2\n", f"model: {zoo['ft2']}\n")
            .replace("base_model: base\n", f"base_model: {zoo['base']}\n")
        )
        result = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--overwrite", "--quiet"])
        assert result.exit_code == 2 and "OUT_DIR" in result.output and "is where input model" in result.output
    assert (zoo["ft1"] / "model.safetensors").read_bytes() == before


def test_a_model_of_another_width_is_not_called_a_vocabulary_mismatch(tmp_path, llama_zoo):
    from conftest import make_llama

    wide = make_llama(tmp_path / "wide", 5, hidden_size=48, intermediate_size=64)
    result, out = _run(tmp_path, {**llama_zoo, "ft2": wide}, GOOD)
    _assert_clean_failure(result, out, "different widths (hidden or intermediate sizes)")
    assert "vocabulary" not in result.output
