"""LoRA inputs: `model: base+adapter` (mergekit's syntax) is the base model with a PEFT LoRA adapter
merged into its weights.

The merged model is written once to the cache, keyed by the content of both directories, and the
reference then resolves to that directory. Every sink (`evomerge merge`, resident search sources,
data-aware pre-passes) therefore reads plain weights, and a search holds the merged source once.
The arithmetic is PEFT's `merge_and_unload`: delta = (B @ A) * alpha / r (alpha / sqrt(r) with
rsLoRA), computed in fp32, cast to the adapter's dtype, added to the weight and rounded to its dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import (
    TAGALONG_FILES,
    TOKENIZER_FILES,
    AtomicDirectory,
    CheckpointReader,
    StreamingShardWriter,
    TensorEntry,
    copy_files,
    shard_file_names,
    shard_layout,
    write_index,
)
from evomerge.io.file_modes import apply_umask
from evomerge.merge.data_aware.cache import cache_root, model_fingerprint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SHARD_BYTES = 5 * 2**30
LORA_VERSION = 1  # bump when the merge arithmetic changes, so cached merges are rebuilt


def split_reference(reference: str) -> tuple[str, str] | None:
    """(base, adapter) for `base+adapter`, else None."""
    if "+" not in reference:
        return None
    base, _, adapter = reference.rpartition("+")
    return (base, adapter) if base and adapter else None


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


class LoraAdapter:
    """A PEFT LoRA adapter directory: its settings and the per-weight deltas it adds."""

    def __init__(self, directory: Path, where: str):
        self.dir, self.where = directory, where
        try:
            self.config: dict[str, Any] = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EvomergeError(f"{where}: cannot read {directory / ADAPTER_CONFIG}: {exc}") from None
        kind = self.config.get("peft_type")
        if kind != "LORA":
            raise EvomergeError(f"{where}: {directory} is a {kind} adapter; only LoRA adapters can be merged")
        if self.config.get("use_dora"):
            raise EvomergeError(f"{where}: {directory} is a DoRA adapter; only plain LoRA can be merged")
        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise EvomergeError(
                f"{where}: {directory} has no {ADAPTER_WEIGHTS} (safetensors only; convert an adapter_model.bin "
                "by loading it with peft and calling save_pretrained(safe_serialization=True))"
            )
        with safe_open(str(weights), framework="pt") as handle:
            self.tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        self.deltas, self.replacements = self._index()

    def _index(self) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        """target weight name -> (A key, B key); full weights saved by `modules_to_save` -> key."""
        deltas: dict[str, tuple[str, str]] = {}
        replacements: dict[str, str] = {}
        for key in self.tensors:
            name = key.removeprefix(PEFT_PREFIX)
            match = re.fullmatch(r"(.+)\.lora_(A|embedding_A)(?:\.weight)?", name)
            if match:
                module, kind = match.groups()
                b_key = key.replace(f".lora_{kind}", ".lora_B" if kind == "A" else ".lora_embedding_B")
                if b_key not in self.tensors:
                    raise EvomergeError(f"{self.where}: adapter tensor {key} has no matching B matrix")
                deltas[f"{module}.weight"] = (key, b_key)
            elif re.search(r"\.lora_(B|embedding_B)(\.weight)?$", name):
                continue
            elif ".lora_" in name or "lora_magnitude_vector" in name:
                raise EvomergeError(f"{self.where}: adapter tensor {key} is not a LoRA A/B matrix evomerge can merge")
            else:
                # full weights PEFT saves: `modules_to_save` copies, and the base weight of an adapted
                # embedding (`base_layer`, a resized vocabulary's new rows included)
                for wrapper in (".modules_to_save.default", ".original_module", ".base_layer"):
                    name = name.replace(wrapper, "")
                replacements[name] = key
        return deltas, replacements

    def scaling(self, module: str, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", rank))
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (of base tensor `name`) with this adapter merged in, in the weight's dtype."""
        if name in self.replacements:
            replaced = self.tensors[self.replacements[name]]
            if replaced.shape != weight.shape:
                raise EvomergeError(
                    f"{self.where}: adapter weight for {name} has shape {tuple(replaced.shape)}, the base "
                    f"{tuple(weight.shape)}; is the adapter for this base model?"
                )
            weight = replaced.to(weight.dtype)
        if name not in self.deltas:
            return weight
        a_key, b_key = self.deltas[name]
        a, b = self.tensors[a_key].float(), self.tensors[b_key].float()
        embedding = "lora_embedding_A" in a_key
        delta = b @ a
        if embedding or self.config.get("fan_in_fan_out"):
            delta = delta.T
        delta = delta * self.scaling(name.removesuffix(".weight"), a.shape[0])
        if delta.shape != weight.shape:
            raise EvomergeError(
                f"{self.where}: LoRA delta for {name} has shape {tuple(delta.shape)}, the base weight "
                f"{tuple(weight.shape)}; is the adapter for this base model?"
            )
        # PEFT casts a linear layer's delta back to the adapter's dtype and adds it in place: in fp32
        # for an fp32 adapter on a bf16 weight (PEFT upcasts adapters by default), in bf16 for a bf16
        # adapter; an embedding's delta is cast to the weight's dtype first
        delta = delta.to(weight.dtype if embedding else self.tensors[b_key].dtype)
        return (weight + delta).to(weight.dtype)

    def targets(self) -> set[str]:
        return set(self.deltas) | set(self.replacements)


def _content_key(base: Path, adapter: Path) -> str:
    digest = hashlib.sha256(f"lora-v{LORA_VERSION}".encode())
    digest.update(model_fingerprint(base).encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(hashlib.sha256((adapter / name).read_bytes()).hexdigest().encode())
    return digest.hexdigest()[:32]


def merged_model_dir(base: Path, adapter: Path, where: str) -> Path:
    """A model directory holding `base` with `adapter` merged in (built once, then reused)."""
    lora = LoraAdapter(adapter, where)
    target = cache_root(None) / "lora" / _content_key(base, adapter)
    if (target / "config.json").is_file():
        return target
    reader = CheckpointReader(base, where)
    try:
        missing = sorted(lora.targets() - set(reader.names()))
        if missing:
            raise EvomergeError(
                f"{where}: the adapter changes {missing[0]!r}, which {base} lacks; is it for another base model?"
            )
        targets = lora.targets()
        entries = [TensorEntry(n, reader.shape(n), reader.dtype(n)) for n in reader.names()]
        shards = shard_layout(entries, SHARD_BYTES)
        names = shard_file_names(len(shards))
        with AtomicDirectory(target, overwrite=True) as out:
            for file, shard in zip(names, shards, strict=True):
                writer = StreamingShardWriter(out.path / file, shard, {"lora_adapter": str(adapter)})
                try:
                    for entry in shard:
                        tensor = reader.get(entry.name)
                        writer.write(entry.name, lora.apply(entry.name, tensor) if entry.name in targets else tensor)
                finally:
                    writer.close()
            if len(shards) > 1:
                write_index(out.path, shards, names)
            copy_files(base, out.path, ("config.json", *TOKENIZER_FILES, *TAGALONG_FILES))
            apply_umask(out.path)
            out.commit()
    finally:
        reader.close()
    return target
