"""Fixtures for the merge-engine tests: tiny but real transformers checkpoints on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_models import fake_llama  # noqa: F401  (re-exported for the merge tests)

torch.set_num_threads(1)

LLAMA_KW = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def make_llama(
    path: Path,
    seed: int,
    *,
    base: Path | None = None,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """A random LlamaForCausalLM saved with save_pretrained; with `base`, a 'fine-tune' of it
    (base weights plus seeded noise), so task vectors are small like real ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_KW, **overrides}))
    if base is not None:
        perturb_from(model, base, seed, noise)
    model.to(dtype).save_pretrained(path)
    return path


def perturb_from(model: torch.nn.Module, base: Path, seed: int, noise: float) -> None:
    """Make `model` a 'fine-tune' of the checkpoint at `base`: its weights plus seeded noise."""
    from safetensors.torch import load_file

    state = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name] + noise * torch.randn(param.shape, generator=generator))


def make_gpt2(path: Path, seed: int, *, base: Path | None = None, noise: float = 0.02) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
    )
    if base is not None:
        perturb_from(model, base, seed, noise)
    model.save_pretrained(path)
    return path


def write_tokenizer(path: Path) -> None:
    """Minimal tokenizer files, enough to check they are copied."""
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": path.name}))
    (path / "special_tokens_map.json").write_text("{}")


@pytest.fixture(scope="session")
def llama_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_zoo")
    base = make_llama(root / "base", 0)
    write_tokenizer(base)
    zoo = {"base": base}
    for i, name in enumerate(["ft1", "ft2", "ft3"], start=1):
        zoo[name] = make_llama(root / name, i, base=base)
        write_tokenizer(zoo[name])
    zoo["deep"] = make_llama(root / "deep", 9, num_hidden_layers=6)
    return zoo


@pytest.fixture(scope="session")
def gpt2_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2_zoo")
    base = make_gpt2(root / "base", 0)
    return {"base": base, "ft1": make_gpt2(root / "ft1", 1, base=base), "ft2": make_gpt2(root / "ft2", 2, base=base)}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
