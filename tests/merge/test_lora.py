"""LoRA inputs (`model: base+adapter`): real PEFT adapters, checked against PEFT's own merge_and_unload,
through `evomerge merge` and through resident search sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_llama, write_tokenizer
from safetensors.torch import load_file, save_file

from evomerge.candidates.materialize import Materializer
from evomerge.errors import EvomergeError
from evomerge.merge.runner import merge_from_file

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SETTINGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora_patterns": dict(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}
    ),
    "modules_to_save": dict(r=2, lora_alpha=4, modules_to_save=["lm_head"]),
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))


def make_adapter(base: Path, out: Path, seed: int, dtype: torch.dtype = torch.float32, **settings) -> dict:
    """Train-free LoRA: random A and B (init_lora_weights=False), saved by PEFT; returns PEFT's
    merge_and_unload state dict for the same base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = LoraConfig(
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens"],
        init_lora_weights=False,
        **settings,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # nudge the saved full modules too, so replacing them is visible
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05)
    peft_model.save_pretrained(out)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def merge_one(tmp_path: Path, reference: str, name: str = "out") -> dict[str, torch.Tensor]:
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": reference}]}))
    merge_from_file(recipe, tmp_path / name, progress=False)
    return load_file(tmp_path / name / "model.safetensors")


@pytest.mark.parametrize("case", SETTINGS)
def test_base_plus_adapter_equals_peft_merge_and_unload(case: str, tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", 0)
    write_tokenizer(base)
    expected = make_adapter(base, tmp_path / "adapter", 1, **SETTINGS[case])
    ours = merge_one(tmp_path, f"{base}+{tmp_path / 'adapter'}")
    original = load_file(base / "model.safetensors")
    assert ours.keys() == original.keys()
    changed = [n for n in ours if not torch.equal(ours[n], original[n])]
    assert any("q_proj" in n for n in changed) and any("embed_tokens" in n for n in changed)
    if case == "modules_to_save":
        assert "lm_head.weight" in changed
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_bf16_base_rounds_like_peft(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", 0, dtype=torch.bfloat16)
    expected = make_adapter(base, tmp_path / "adapter", 1, dtype=torch.bfloat16, **SETTINGS["plain"])
    ours = merge_one(tmp_path, f"{base}+{tmp_path / 'adapter'}")
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name


def test_a_search_source_with_an_adapter_is_merged_once_and_equals_the_disk_merge(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", 0)
    other = make_llama(tmp_path / "other", 2, base=base)
    make_adapter(base, tmp_path / "adapter", 1, **SETTINGS["plain"])
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(other), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    }
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(recipe))
    merge_from_file(path, tmp_path / "disk", progress=False)
    disk = load_file(tmp_path / "disk" / "model.safetensors")
    materializer = Materializer([str(base), str(other)], device="cpu")
    model = materializer.apply(recipe).model
    state = model.state_dict()
    for name, tensor in disk.items():
        assert torch.equal(state[name], tensor), name
    assert len(list((tmp_path / "cache" / "lora").iterdir())) == 1  # built once, reused by both paths


def test_bad_adapters_fail_with_one_line(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", 0)
    with pytest.raises(EvomergeError, match=r"names LoRA adapter .*adapter_config.json"):
        merge_one(tmp_path, f"{base}+{tmp_path / 'nowhere'}")
    make_adapter(base, tmp_path / "adapter", 1, **SETTINGS["plain"])
    other_base = make_llama(tmp_path / "wide", 0, hidden_size=48, intermediate_size=64)
    with pytest.raises(EvomergeError, match="is the adapter for this base model"):
        merge_one(tmp_path, f"{other_base}+{tmp_path / 'adapter'}", name="wide_out")
    assert not (tmp_path / "wide_out").exists()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(EvomergeError, match="DoRA"):
        merge_one(tmp_path, f"{base}+{tmp_path / 'adapter'}", name="dora_out")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    weights = {k: v for k, v in weights.items() if ".lora_B" not in k or "q_proj" not in k}
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(EvomergeError, match="no matching B matrix"):
        merge_one(tmp_path, f"{base}+{tmp_path / 'adapter'}", name="broken_out")
