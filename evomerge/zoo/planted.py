"""A DFS problem whose best path is known by construction, for testing the DFS search.

From a trained model T (the toy zoo's `add` expert), two sources are written:

- `damaged`: T with layer `hole` replaced by seeded noise of the same per-tensor scale (T's
  layout, so it is the anchor: embeddings, first and last layer);
- `carrier`: T's layers in permuted slots, with `hole` in slot `carrier_slot`, every layer's
  residual writes (o_proj, down_proj) multiplied by `shift` and its embeddings too, so the
  carrier's residual stream runs `shift` times larger than T's (a distribution shift between
  models, the reason the paper's W exists).

The planted path: damaged 0..hole-1, carrier `carrier_slot` entered with input scale `shift`,
then damaged hole+1..end entered with scale 1/shift. In a pre-norm decoder that path computes
exactly T (up to the norm epsilon), so it scores what T scores; the same path with scales fixed
to 1 lets the shifted layer write `shift` times too much into the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

RESIDUAL_WRITES = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class Planted:
    """Where the planted sources are and the path that rebuilds T from them."""

    damaged: Path
    carrier: Path
    path: list[tuple[int, int, float]]  # (model, layer, input scale); model 0 = damaged, 1 = carrier
    shift: float


def build_planted(
    teacher: Path, out_dir: Path, *, hole: int = 2, shift: float = 3.0, permutation: tuple[int, ...] | None = None
) -> Planted:
    """Write `damaged` and `carrier` under out_dir (deterministic: seeded noise, fixed permutation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    n = model.config.num_hidden_layers
    if not 0 < hole < n - 1:
        raise ValueError(f"hole must be an inner layer (1..{n - 2}), got {hole}")
    # carrier slot j holds teacher layer permutation[j]; default: a rotation putting `hole` in slot 0
    permutation = permutation or tuple((hole + j) % n for j in range(n))
    carrier_slot = permutation.index(hole)
    teacher_state = {k: v.clone() for k, v in model.state_dict().items()}

    generator = torch.Generator().manual_seed(1234)
    damaged = dict(teacher_state)
    prefix = f"model.layers.{hole}."
    for key, value in teacher_state.items():
        if key.startswith(prefix) and value.dim() == 2:
            damaged[key] = torch.randn(value.shape, generator=generator) * value.std()
    model.load_state_dict(damaged)
    model.save_pretrained(out_dir / "damaged")
    tokenizer.save_pretrained(out_dir / "damaged")

    carrier = dict(teacher_state)
    for slot, layer in enumerate(permutation):
        for key, value in teacher_state.items():
            if key.startswith(f"model.layers.{layer}."):
                suffix = key[len(f"model.layers.{layer}.") :]
                scaled = suffix in RESIDUAL_WRITES
                carrier[f"model.layers.{slot}.{suffix}"] = value * shift if scaled else value
    carrier["model.embed_tokens.weight"] = teacher_state["model.embed_tokens.weight"] * shift
    if "lm_head.weight" in carrier and not model.config.tie_word_embeddings:
        carrier["lm_head.weight"] = teacher_state["lm_head.weight"]
    model.load_state_dict(carrier)
    model.save_pretrained(out_dir / "carrier")
    tokenizer.save_pretrained(out_dir / "carrier")

    # plain tuples (evomerge.search.space.dfs.Step's fields): the zoo may not import the search
    path = [(0, layer, 1.0) for layer in range(hole)]
    path.append((1, carrier_slot, shift))
    path.append((0, hole + 1, 1.0 / shift))
    path += [(0, layer, 1.0) for layer in range(hole + 2, n)]
    return Planted(out_dir / "damaged", out_dir / "carrier", path, shift)
