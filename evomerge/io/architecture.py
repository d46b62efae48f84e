"""Which tensor belongs to which layer, per model family, and the output config for a layer stack.

Families are data: one JSON file per family in `evomerge/io/architectures/` (see docs/merge.md,
"Adding an architecture"). A tensor is either a layer tensor (`<layer prefix><index>.<suffix>`),
a pre-layer tensor (embeddings) or a post-layer tensor (final norm, lm_head).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from evomerge.errors import EvomergeError

Position = Literal["pre", "layer", "post"]
ARCHITECTURES_DIR = "evomerge/io/architectures"  # where a new family's file goes (for messages and docs)
_REQUIRED = ("family", "architectures", "layer_prefixes", "pre_layer", "post_layer", "embedding")


@dataclass(frozen=True)
class Architecture:
    family: str
    layer_pattern: re.Pattern[str]  # group 1: prefix incl. trailing dot, 2: index, 3: suffix
    num_layers_key: str
    pre_prefixes: tuple[str, ...]
    post_prefixes: tuple[str, ...]
    embedding: tuple[str, ...]  # input-embedding tensor names (lm_head may be tied to the first present)
    lm_head: str = "lm_head.weight"
    layer_prefixes: tuple[str, ...] = ()  # the first is the causal-LM module's; others: headless checkpoints
    # Substrings naming the layer tensors that write into the residual stream (attention output and
    # MLP down projections): scaling them by 1/c equals scaling a pre-norm layer's input by c.
    # Empty where a norm sits between them and the residual add (Gemma2/3, OLMo2): no DFS scales.
    residual_outputs: tuple[str, ...] = ()
    # Config keys holding one value per layer (e.g. `layer_types`); a layer stack rewrites them.
    layer_config_lists: tuple[str, ...] = ()
    # Layer tensors that pack several projections (q|k|v, gate|up) along their output axis.
    fused_projections: tuple[str, ...] = ()
    # What an absent `tie_word_embeddings` means for this family's config class.
    tie_word_embeddings_default: bool = False
    # The permutation symmetry (a spec in merge/data_aware/permutation.py) rebasin and REPAIR use;
    # None where no spec fits (q/k norms, fused projections, LayerNorm biases).
    symmetry: str | None = None
    # (checkpoint prefix, module prefix) where transformers renames tensors on load (GPT-NeoX embed_out.).
    module_renames: tuple[tuple[str, str], ...] = ()
    architectures: tuple[str, ...] = ()  # transformers class names in config.json `architectures`
    model_types: tuple[str, ...] = ()  # config.json `model_type` values (checkpoints without `architectures`)

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
            f"this checkpoint layout is not supported (its prefixes are in {ARCHITECTURES_DIR}/{self.family}.json)"
        )

    def layer_name(self, prefix: str, index: int, suffix: str) -> str:
        return f"{prefix}{index}.{suffix}"

    def layer_prefix(self, name: str) -> str:
        match = self.layer_pattern.match(name)
        assert match, name
        return match.group(1)

    def module_name(self, name: str) -> str:
        """The name transformers gives checkpoint tensor `name` once loaded (see module_renames)."""
        for checkpoint_prefix, module_prefix in self.module_renames:
            if name.startswith(checkpoint_prefix):
                return module_prefix + name[len(checkpoint_prefix) :]
        return name

    def is_vocabulary(self, name: str) -> bool:
        return name in self.embedding or name == self.lm_head


def _from_data(data: Mapping[str, Any], source: str) -> Architecture:
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise EvomergeError(f"{source}: architecture file lacks {', '.join(missing)}")
    prefixes = "|".join(re.escape(p) for p in data["layer_prefixes"])
    return Architecture(
        family=data["family"],
        layer_pattern=re.compile(rf"^({prefixes})(\d+)\.(.+)$"),
        num_layers_key=data.get("num_layers_key", "num_hidden_layers"),
        pre_prefixes=tuple(data["pre_layer"]),
        post_prefixes=tuple(data["post_layer"]),
        embedding=tuple(data["embedding"]),
        lm_head=data.get("lm_head", "lm_head.weight"),
        layer_prefixes=tuple(data["layer_prefixes"]),
        residual_outputs=tuple(data.get("residual_outputs", ())),
        layer_config_lists=tuple(data.get("layer_config_lists", ())),
        fused_projections=tuple(data.get("fused_projections", ())),
        tie_word_embeddings_default=bool(data.get("tie_word_embeddings_default", False)),
        symmetry=data.get("symmetry"),
        module_renames=tuple(dict(data.get("module_renames", {})).items()),
        architectures=tuple(data["architectures"]),
        model_types=tuple(data.get("model_types", ())),
    )


@cache
def known_architectures() -> dict[str, Architecture]:
    """Every family shipped in the package, by family name (read once)."""
    folder = resources.files("evomerge.io") / "architectures"
    found: dict[str, Architecture] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            arch = _from_data(json.loads(entry.read_text(encoding="utf-8")), f"{ARCHITECTURES_DIR}/{entry.name}")
            found[arch.family] = arch
    return found


def detect_architecture(config: Mapping[str, Any], where: str) -> Architecture:
    """The family of a model from its config.json, or a one-line error that says how to add it."""
    archs = known_architectures().values()
    listed = config.get("architectures")
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(c, str) for c in listed)):
        raise EvomergeError(
            f"{where}: config.json architectures must be a list of class names, e.g. [LlamaForCausalLM] "
            f"(got {listed!r})"
        )
    for cls in listed or []:
        for arch in archs:
            if cls in arch.architectures:
                return arch
    model_type = config.get("model_type")
    if not config.get("architectures"):
        for arch in archs:
            if model_type in arch.model_types:
                return arch
    found = ", ".join(config.get("architectures") or []) or f"model_type={model_type!r}"
    supported = sorted(cls for arch in archs for cls in arch.architectures)
    raise EvomergeError(
        f"{where}: unsupported architecture {found}; to add it, write {ARCHITECTURES_DIR}/<family>.json "
        "(architectures, layer_prefixes, pre_layer, post_layer, embedding, residual_outputs, layer_config_lists; "
        f"see docs/merge.md); supported: {', '.join(supported)}"
    )


def num_layers(config: Mapping[str, Any], arch: Architecture, where: str) -> int:
    value = config.get(arch.num_layers_key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EvomergeError(f"{where}: config.json has no integer {arch.num_layers_key}")
    if value < 1:
        raise EvomergeError(f"{where}: config.json {arch.num_layers_key} must be >= 1 (got {value})")
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
    per-layer lists such as `layer_types` follow the layers they describe, so transformers 5 (which
    checks their length against `num_hidden_layers`) loads a stack.
    """
    config = dict(donor)
    config[arch.num_layers_key] = len(layer_sources)
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = len(layer_sources)
    for key in arch.layer_config_lists:
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
    if has_lm_head and config.get("tie_word_embeddings", arch.tie_word_embeddings_default):
        # The merged lm_head differs from the merged embeddings; loading must not re-tie them.
        config["tie_word_embeddings"] = False
    return config
