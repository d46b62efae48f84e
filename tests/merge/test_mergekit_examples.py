"""Every real mergekit config in tests/data/mergekit_examples (verbatim copies of mergekit's
`examples/*.yml`) either merges, on tiny stand-ins of the models it names, or is refused with one
`EvomergeError` that names the field; recipes using keys evomerge does not implement are refused,
never run with the key ignored."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import load_recipe, loads_recipe
from evomerge.merge.runner import merge_from_file

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "mergekit_examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yml"))
SHARED = Path(__file__).resolve().parents[3] / "shared" / "mergekit-examples"
FIELD = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")  # `slices[0].residual_weight: ...`

# 40 layers: the examples slice 13B Llamas up to layer 40
TINY = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=40,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def _references(recipe_path: Path) -> set[str]:
    return set(load_recipe(recipe_path).referenced_models())


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """A directory with a tiny random model at every path the examples name (Mistral ones as
    MistralForCausalLM), each a perturbed copy of one base so that task vectors are small."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("mergekit_examples")
    names = sorted(set().union(*(_references(p) for p in EXAMPLES)))
    for family, config_cls, model_cls in (
        ("mistral", MistralConfig, MistralForCausalLM),
        ("llama", LlamaConfig, LlamaForCausalLM),
    ):
        torch.manual_seed(0)
        base_state = model_cls(config_cls(**TINY)).state_dict()
        for i, name in enumerate(n for n in names if ("istral" in n) == (family == "mistral")):
            model = model_cls(config_cls(**TINY))
            generator = torch.Generator().manual_seed(i + 1)
            with torch.no_grad():
                for key, param in model.named_parameters():
                    param.copy_(base_state[key] + 0.02 * torch.randn(param.shape, generator=generator))
            model.save_pretrained(root / name)
    for path in EXAMPLES:
        shutil.copy(path, root / path.name)
    return root


def test_the_corpus_holds_every_shared_example():
    """tests/data keeps verbatim copies of the shared corpus (when the shared folder is present)."""
    assert {p.name for p in EXAMPLES} >= {
        "arcee_fusion.yml",
        "bio-merge.yml",
        "gradient-slerp.yml",
        "linear.yml",
        "orcamini-platy-44layer.yml",
        "ties.yml",
    }
    if SHARED.is_dir():
        for shared in SHARED.glob("*.yml"):
            assert (EXAMPLES_DIR / shared.name).read_bytes() == shared.read_bytes(), shared.name


# example file -> the field its refusal must name; every other example must merge. Empty: all of
# mergekit's examples use only what evomerge implements.
REFUSED: dict[str, str] = {}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_merges_or_is_refused_by_field(stand_ins: Path, tmp_path: Path, path: Path):
    out = tmp_path / "out"
    if path.name in REFUSED:
        with pytest.raises(EvomergeError) as info:
            merge_from_file(stand_ins / path.name, out, progress=False)
        message = str(info.value)
        assert FIELD.match(message) and message.startswith(REFUSED[path.name]) and "\n" not in message, message
        assert not out.exists()
        return
    merge_from_file(stand_ins / path.name, out, progress=False)
    recipe = load_recipe(path)
    config = json.loads((out / "config.json").read_text())
    if recipe.slices is not None:
        expected_layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
    else:
        expected_layers = TINY["num_hidden_layers"]
    assert config["num_hidden_layers"] == expected_layers
    merged = load_file(str(out / "model.safetensors"))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(recipe.out_dtype or recipe.dtype or "")
    assert dtype is None or all(t.dtype == dtype for t in merged.values())
    first = recipe.base_model or (recipe.models or recipe.slices[0].sources)[0].model  # type: ignore[index]
    source = load_file(str(stand_ins / first / "model.safetensors"))
    if recipe.merge_method != "passthrough":  # a merge of distinct models differs from its first input
        diff = max((merged[n].float() - source[n].float()).abs().max().item() for n in merged if n in source)
        assert diff > 1e-3, path.name


UNIMPLEMENTED = {
    "modules": (
        "merge_method: linear\nmodules:\n  text_decoder:\n    models:\n      - model: a\n"
        "        parameters: {weight: 1}\n",
        "modules: ",
    ),
    "residual_weight": (
        "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
        "    residual_weight: 0.5\n",
        "slices[0].residual_weight: ",
    ),
    "unknown top-level key": (
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nbase_modle: b\n",
        "base_modle: ",
    ),
    "unknown slice key": (
        "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    weight: 2\n",
        "slices[0].weight: ",
    ),
    "unknown source key": (
        "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2], lora: x}]\n",
        "slices[0].sources[0].lora: ",
    ),
    "unknown method parameter": (
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, densty: 0.5}}]\n",
        "models[0].parameters.densty: ",
    ),
}


@pytest.mark.parametrize("case", UNIMPLEMENTED, ids=str)
def test_unimplemented_mergekit_keys_are_refused_by_name(case: str):
    text, prefix = UNIMPLEMENTED[case]
    with pytest.raises(EvomergeError) as info:
        recipe = loads_recipe(text)
        from evomerge.merge.validation import validate_recipe

        validate_recipe(recipe)
    message = str(info.value)
    assert message.startswith(prefix) and "\n" not in message, message


def test_a_modules_recipe_from_the_cli_is_one_line_and_writes_nothing(tmp_path: Path):
    from typer.testing import CliRunner

    from evomerge.cli.app import app

    recipe = tmp_path / "vlm.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "modules": {"text": {"models": [{"model": "a"}]}}}))
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: modules: "), result.output
    assert not (tmp_path / "out").exists()
