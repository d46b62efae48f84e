"""What a merge plan is made of: tensor references, per-tensor jobs, the models a recipe names
(`ModelInfo`, found by `ModelCatalog`) and the plan itself. Plain data, so that the pre-passes of
data-aware methods (`data_aware/prepare.py`) can take a plan without importing the planner, which
validates recipes against the method registry that names those pre-passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError, shown
from evomerge.io.architecture import Architecture, detect_architecture, num_layers
from evomerge.io.checkpoint import CheckpointReader, read_config
from evomerge.merge.lora import ADAPTER_CONFIG, merged_model_dir, split_reference
from evomerge.merge.methods.base import make_generator
from evomerge.merge.methods.spec import MergeMethod
from evomerge.merge.recipe import Recipe

# -- what a plan is made of ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRef:
    """One tensor of one source model: `model` indexes `MergePlan.models`. With `vocabulary` (a
    `merge.vocabulary.VocabularyGroup`), the tensor with its rows in the output vocabulary's order:
    sources resolve such refs with `merge.vocabulary.AlignedTensors`."""

    model: int
    name: str
    vocabulary: Any = None


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    base: TensorRef | None
    inputs: tuple[TensorRef, ...]  # the non-base inputs, in recipe order
    input_params: tuple[Mapping[str, Any], ...]  # aligned with `inputs`
    params: Mapping[str, Any]
    layer: int | None = None  # output layer index, None for embeddings / final tensors


@dataclass
class ModelInfo:
    """A source model as the planner sees it: config and tensor headers, no tensor data."""

    reference: str
    path: Path
    config: dict[str, Any]
    arch: Architecture
    num_layers: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    layers: dict[int, dict[str, str]] = field(default_factory=dict)  # layer -> suffix -> tensor name
    layer_prefix: str = ""

    def __post_init__(self) -> None:
        for name in self.shapes:
            position, index, suffix = self.arch.classify(name)
            if position == "layer":
                self.layers.setdefault(index, {})[suffix] = name  # type: ignore[arg-type]
                self.layer_prefix = self.layer_prefix or self.arch.layer_prefix(name)

    @classmethod
    def from_reader(cls, reference: str, reader: CheckpointReader, where: str) -> ModelInfo:
        arch = detect_architecture(reader.config, where)
        names = reader.names()
        info = cls(
            reference=reference,
            path=reader.dir,
            config=reader.config,
            arch=arch,
            num_layers=num_layers(reader.config, arch, where),
            shapes={n: reader.shape(n) for n in names},
            dtypes={n: reader.dtype(n) for n in names},
        )
        if info.num_layers > len(info.layers):  # a crafted or mismatched config.json
            raise EvomergeError(
                f"{where}: config.json of {reference!r} says {arch.num_layers_key}: {shown(info.num_layers)} but "
                f"its weights hold {len(info.layers)} layers; fix config.json"
            )
        return info


@dataclass
class MergePlan:
    recipe: Recipe  # with the seed actually used
    method: MergeMethod
    models: tuple[ModelInfo, ...]
    jobs: tuple[TensorJob, ...]
    seed: int
    input_dtype: torch.dtype | None  # recipe `dtype`: inputs are rounded to it before the fp32 math
    out_config: dict[str, Any]
    donor: int  # model whose config and extra files the output inherits
    tokenizer_model: int  # model whose tokenizer files are copied (when `vocabulary` is None)
    layer_sources: list[tuple[int, int]] = field(default_factory=list)  # output layer -> (model, layer)
    vocabulary: Any = None  # merge.vocabulary.Vocabulary: the merged tokenizer, saved with the model
    prepared: Any = None  # model-level pre-pass result of a data-aware method (`run_plan` fills it)

    def generators(self, job: TensorJob, device: torch.device | str = "cpu") -> list[torch.Generator | None]:
        """Per-input RNGs for random methods, seeded from (seed, input position, output tensor name):
        masks do not depend on the order in which tensors are merged."""
        if not self.method.random:
            return []
        return [make_generator(self.seed, i, job.name, device) for i in range(len(job.inputs))]

    @property
    def parameters(self) -> int:
        """Elements in all output tensors (the merged model's parameter count)."""
        return sum(math.prod(job.shape) for job in self.jobs)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(job.shape) * torch.empty((), dtype=job.out_dtype).element_size() for job in self.jobs)


class ModelCatalog:
    """Resolves model references to `ModelInfo`, caching headers so repeated planning is cheap."""

    def __init__(self, search_dirs: Sequence[Path] = ()):
        self.search_dirs = [Path(d) for d in search_dirs]
        self._infos: dict[Path, ModelInfo] = {}
        self.vocabularies: dict[Any, Any] = {}  # merged vocabularies, built once per recipe tokenizer setting
        self._located: dict[str, Path] = {}  # a search plans the same references for every candidate

    def resolve(self, reference: str, where: str) -> ModelInfo:
        path = self._located.get(reference)
        if path is None:
            path = self._located[reference] = self._locate(reference, where)
        info = self._infos.get(path)
        if info is None:
            detect_architecture(read_config(path, where), where)  # fail on the config before the weights
            reader = CheckpointReader(path, where)
            info = ModelInfo.from_reader(reference, reader, where)
            reader.close()
            self._infos[path] = info
        if info.reference != reference:
            info = ModelInfo(
                reference=reference,
                path=info.path,
                config=info.config,
                arch=info.arch,
                num_layers=info.num_layers,
                shapes=info.shapes,
                dtypes=info.dtypes,
            )
        return info

    def _locate(self, reference: str, where: str) -> Path:
        found = self._find(reference, "config.json", where)
        if found is not None:
            return found
        lora = split_reference(reference)
        if lora is not None:
            base, adapter = lora
            adapter_dir = self._find(adapter, ADAPTER_CONFIG, where)
            if adapter_dir is None:
                raise EvomergeError(
                    f"{where}: {reference!r} names LoRA adapter {adapter!r}, but no {ADAPTER_CONFIG} was found there"
                )
            return merged_model_dir(self._locate(base, where), adapter_dir, where)
        hint = (
            "; evomerge reads local model directories only (no hub downloads)"
            if "/" in reference and not self._options(reference)[0].is_absolute()
            else ""
        )
        looked = ", ".join(str(o) for o in self._options(reference))
        raise EvomergeError(f"{where}: model {reference!r} not found (looked for config.json in {looked}){hint}")

    def _options(self, reference: str) -> list[Path]:
        candidate = Path(reference)
        try:
            candidate = candidate.expanduser()
        except RuntimeError:  # `~name` of no known user: a relative path like any other
            pass
        return [candidate] if candidate.is_absolute() else [candidate] + [d / candidate for d in self.search_dirs]

    def _find(self, reference: str, marker: str, where: str) -> Path | None:
        try:
            return next((o.resolve() for o in self._options(reference) if (o / marker).is_file()), None)
        except OSError as exc:  # a name too long for the file system, a folder that cannot be read
            raise EvomergeError(
                f"{where}: cannot look for model {shown(reference)}: {exc.strerror}; check the path"
            ) from None
