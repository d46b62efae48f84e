"""Which tensor belongs to which layer, per model family, and the output config for a layer stack.

Supported: Llama-style decoders (Llama, Mistral, Qwen2: `model.layers.N.*`) and GPT-2
(`transformer.h.N.*`, or `h.N.*` in headless checkpoints). A tensor is either a layer tensor
(index + suffix), a pre-layer tensor (embeddings) or a post-layer tensor (final norm, lm_head).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evomerge.errors import EvomergeError

Position = Literal["pre", "layer", "post"]


@dataclass(frozen=True)
class Architecture:
    family: str
    layer_pattern: re.Pattern[str]  # group 1: prefix incl. trailing dot, 2: index, 3: suffix
    num_layers_key: str
    pre_prefixes: tuple[str, ...]
    post_prefixes: tuple[str, ...]
    embedding: tuple[str, ...]  # input-embedding tensor names (lm_head may be tied to the first present)
    lm_head: str = "lm_head.weight"
    # Substrings naming the layer tensors that write into the residual stream (attention output and
    # MLP down projections): scaling them by 1/c equals scaling a pre-norm layer's input by c.
    residual_outputs: tuple[str, ...] = ()

    def classify(self, name: str) -> tuple[Position, int | None, str]:
        """(position, layer index or None, suffix within the layer or the full name)."""
        match = self.layer_pattern.match(name)
        if match:
            return "layer", int(match.group(2)), match.group(3)
        if name.startswith(self.pre_prefixes):
            return "pre", None, name
        if name.startswith(self.post_prefixes):
            return "post", None, name
        raise EvomergeError(
            f"tensor {name!r} is neither a layer, embedding nor final tensor of a {self.family} model; "
            "this checkpoint layout is not supported"
        )

    def layer_name(self, prefix: str, index: int, suffix: str) -> str:
        return f"{prefix}{index}.{suffix}"

    def layer_prefix(self, name: str) -> str:
        match = self.layer_pattern.match(name)
        assert match, name
        return match.group(1)

    def is_vocabulary(self, name: str) -> bool:
        return name in self.embedding or name == self.lm_head


LLAMA_LIKE = Architecture(
    family="llama",
    layer_pattern=re.compile(r"^(model\.layers\.)(\d+)\.(.+)$"),
    num_layers_key="num_hidden_layers",
    pre_prefixes=("model.embed_tokens.",),
    post_prefixes=("model.norm.", "lm_head."),
    embedding=("model.embed_tokens.weight",),
    residual_outputs=("o_proj", "down_proj"),
)

GPT2 = Architecture(
    family="gpt2",
    layer_pattern=re.compile(r"^((?:transformer\.)?h\.)(\d+)\.(.+)$"),
    num_layers_key="n_layer",
    pre_prefixes=("transformer.wte.", "transformer.wpe.", "wte.", "wpe."),
    post_prefixes=("transformer.ln_f.", "ln_f.", "lm_head."),
    embedding=("transformer.wte.weight", "wte.weight"),
    residual_outputs=("c_proj",),
)

_BY_CLASS = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "GPT2LMHeadModel": GPT2,
}
_BY_MODEL_TYPE = {"llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gpt2": GPT2}


def detect_architecture(config: Mapping[str, Any], where: str) -> Architecture:
    """The family of a model from its config.json, or a one-line error naming what was found."""
    for cls in config.get("architectures") or []:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE and not config.get("architectures"):
        return _BY_MODEL_TYPE[model_type]
    found = ", ".join(config.get("architectures") or []) or f"model_type={model_type!r}"
    raise EvomergeError(f"{where}: unsupported architecture {found}; supported: {', '.join(sorted(_BY_CLASS))}")


def num_layers(config: Mapping[str, Any], arch: Architecture, where: str) -> int:
    value = config.get(arch.num_layers_key)
    if not isinstance(value, int):
        raise EvomergeError(f"{where}: config.json has no integer {arch.num_layers_key}")
    return value


def output_config(
    donor: Mapping[str, Any],
    arch: Architecture,
    layer_sources: Sequence[tuple[Mapping[str, Any], int]],
    *,
    dtype_name: str,
    has_lm_head: bool,
) -> dict[str, Any]:
    """The donor's config rewritten for the merged model.

    `layer_sources[i]` is (config of the model output layer i comes from, its layer index there);
    per-layer lists such as `layer_types` follow the layers they describe.
    """
    config = dict(donor)
    config[arch.num_layers_key] = len(layer_sources)
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = len(layer_sources)
    for key in ("layer_types",):
        if isinstance(donor.get(key), list):
            rebuilt = []
            for source_config, index in layer_sources:
                values = source_config.get(key)
                rebuilt.append(
                    values[index]
                    if isinstance(values, list) and index < len(values)
                    else donor[key][min(index, len(donor[key]) - 1)]
                )
            config[key] = rebuilt
    if "max_window_layers" in config and isinstance(config["max_window_layers"], int):
        config["max_window_layers"] = min(config["max_window_layers"], len(layer_sources))
    config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype_name
    if has_lm_head and config.get("tie_word_embeddings", arch is GPT2):
        # The merged lm_head differs from the merged embeddings; loading must not re-tie them.
        config["tie_word_embeddings"] = False
    return config
