"""Tiny model directories written straight with safetensors: headers and configs are what planning
and search-space binding read, so these stand in for real checkpoints where weights do not matter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYER_MATRICES = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def fake_llama(path: Path, layers: int, *, seed: int = 0, hidden: int = 8, vocab: int = 16) -> Path:
    """A Llama-layout checkpoint with square layer matrices (the residual outputs o_proj/down_proj included)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g),
    }
    for i in range(layers):
        for suffix in LAYER_MATRICES:
            tensors[f"model.layers.{i}.{suffix}"] = torch.randn(hidden, hidden, generator=g)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path
