"""Parameter-space (PS) genes and their decoding into an ordinary mergekit recipe.

Genes: one value per (layer group, source model, tensor class, gene kind). Decoding writes them as
mergekit parameters, so the recipe is what `evomerge merge` and mergekit run unchanged:

* `granularity: whole` -> a `models:` recipe with one scalar per model (the paper's final PS);
* blocks of k layers / single layers -> one slice per group, each source with scalar parameters
  over its `layer_range` (exact per-layer values, unlike a gradient, which interpolates);
* `split_attn_mlp` -> filtered values `[{filter: attn}, {filter: mlp}, {value: mean}]`; the rest
  of a layer (norms) takes the mean of the two;
* `embedding_genes` -> filtered values for the embedding (pre-layer) and final (post-layer) tensors,
  matched by the architecture's tensor-name prefixes, in the first and last group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.jobs import ModelInfo
from evomerge.merge.methods.registry import get_method
from evomerge.merge.recipe import Recipe, parse_recipe
from evomerge.search.space.config import PSConfig
from evomerge.search.space.genes import Gene

TENSOR_CLASSES = ("attn", "mlp")  # substrings of attention / MLP tensor names in Llama and GPT-2 layouts


@dataclass(frozen=True)
class LayerGroup:
    """Layers [start, end) of every source, or the embedding ('pre') / final ('post') tensors."""

    name: str
    start: int = 0
    end: int = 0
    position: str = "layer"  # layer | pre | post


def model_labels(references: Sequence[str]) -> list[str]:
    """Short, unique labels for gene names: the directory name, suffixed when two collide."""
    names = [Path(r).name or r for r in references]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def layer_groups(num_layers: int, granularity: str | int) -> list[LayerGroup]:
    if granularity == "whole":
        return [LayerGroup("all", 0, num_layers)]
    k = 1 if granularity == "layer" else int(granularity)
    groups = []
    for start in range(0, num_layers, k):
        end = min(start + k, num_layers)
        groups.append(LayerGroup(f"L{start}" if end - start == 1 else f"L{start}-{end - 1}", start, end))
    return groups


class PSLayout:
    """The PS genome of one space, bound to the source models' layer counts and architecture."""

    def __init__(self, config: PSConfig, sources: Sequence[ModelInfo], base: ModelInfo | None):
        self.config = config
        self.method = get_method(config.method)
        self.sources = list(sources)
        self.base = base if self.method.base in ("required", "optional") else None
        self.labels = model_labels([s.reference for s in self.sources])
        self.kinds = self._gene_kinds()
        self.num_layers = self._common_depth()
        self.groups = layer_groups(self.num_layers, config.granularity)
        self.classes: tuple[str | None, ...] = TENSOR_CLASSES if config.split_attn_mlp else (None,)
        arch = self.sources[0].arch
        self.pre_filters = arch.pre_prefixes
        self.post_filters = arch.post_prefixes
        self.genes = self._genes()

    def _gene_kinds(self) -> dict[str, tuple[float, float]]:
        float_params = {p.name: p for p in self.method.model_params if p.kind is float}
        kinds = self.config.genes
        if kinds is None:
            kinds = {k: (0.0, 1.0) for k in ("weight", "density") if k in float_params}
        for kind in kinds:
            if kind not in float_params:
                raise EvomergeError(
                    f"ps.genes.{kind}: not a per-model numeric parameter of {self.method.name} "
                    f"(use one of {', '.join(float_params)})"
                )
        for kind in self.config.x0:
            if kind not in kinds:
                raise EvomergeError(f"ps.x0.{kind}: no such gene kind (genes: {', '.join(kinds)})")
        for kind, (low, high) in kinds.items():
            spec = float_params[kind]
            if (spec.low is not None and low < spec.low) or (spec.high is not None and high > spec.high):
                raise EvomergeError(
                    f"ps.genes.{kind}: bounds [{low}, {high}] exceed what {self.method.name} "
                    f"accepts [{spec.low}, {spec.high}]"
                )
            x0 = self.config.x0.get(kind, (low + high) / 2)
            if not low <= x0 <= high:
                raise EvomergeError(f"ps.x0.{kind}: {x0} is outside the bounds [{low}, {high}]")
        return dict(kinds)

    def _common_depth(self) -> int:
        infos = self.sources + ([self.base] if self.base else [])
        depth = infos[0].num_layers
        for info in infos:
            if info.num_layers != depth:
                raise EvomergeError(
                    f"models: {info.reference!r} has {info.num_layers} layers but "
                    f"{infos[0].reference!r} has {depth}; PS merging needs equal depths"
                )
        return depth

    def _all_groups(self) -> list[LayerGroup]:
        if not self.config.embedding_genes:
            return self.groups
        return [LayerGroup("embed", position="pre"), *self.groups, LayerGroup("head", position="post")]

    def _genes(self) -> list[Gene]:
        genes = []
        for group in self._all_groups():
            classes = self.classes if group.position == "layer" else (None,)
            for label in self.labels:
                for cls in classes:
                    for kind, (low, high) in self.kinds.items():
                        x0 = self.config.x0.get(kind, (low + high) / 2)
                        parts = [group.name, label] + ([cls] if cls else []) + [kind]
                        genes.append(Gene(".".join(parts), low, high, x0))
        return genes

    # -- decoding --------------------------------------------------------------------------------

    def values(self, genome: Sequence[float]) -> dict[tuple[str, int, str | None, str], float]:
        """(group name, source index, tensor class, kind) -> rounded value, in gene order."""
        out: dict[tuple[str, int, str | None, str], float] = {}
        it = iter(genome)
        for group in self._all_groups():
            classes = self.classes if group.position == "layer" else (None,)
            for model in range(len(self.sources)):
                for cls in classes:
                    for kind in self.kinds:
                        out[(group.name, model, cls, kind)] = round(float(next(it)), self.config.decimals)
        return out

    def _setting(self, values: dict, group: LayerGroup, model: int, kind: str, *, first: bool, last: bool) -> Any:
        filtered: list[dict[str, Any]] = []
        if self.config.embedding_genes and first:
            filtered += [{"filter": f, "value": values[("embed", model, None, kind)]} for f in self.pre_filters]
        if self.config.embedding_genes and last:
            filtered += [{"filter": f, "value": values[("head", model, None, kind)]} for f in self.post_filters]
        if self.config.split_attn_mlp:
            attn, mlp = values[(group.name, model, "attn", kind)], values[(group.name, model, "mlp", kind)]
            filtered += [
                {"filter": "attn", "value": attn},
                {"filter": "mlp", "value": mlp},
                {"value": round((attn + mlp) / 2, self.config.decimals)},
            ]
            return filtered
        scalar = values[(group.name, model, None, kind)]
        return filtered + [{"value": scalar}] if filtered else scalar

    def _parameters(self, values: dict, group: LayerGroup, model: int, *, first: bool, last: bool) -> dict:
        return {kind: self._setting(values, group, model, kind, first=first, last=last) for kind in self.kinds}

    def decode(self, genome: Sequence[float], seed: int | None) -> Recipe:
        values = self.values(genome)
        data: dict[str, Any] = {"merge_method": self.method.name}
        if self.base is not None:
            data["base_model"] = self.base.reference
        if self.config.granularity == "whole":
            group = self.groups[0]
            data["models"] = [
                {"model": src.reference, "parameters": self._parameters(values, group, i, first=True, last=True)}
                for i, src in enumerate(self.sources)
            ]
        else:
            data["slices"] = [
                self._slice(values, group, gi == 0, gi == len(self.groups) - 1) for gi, group in enumerate(self.groups)
            ]
        if self.config.parameters:
            data["parameters"] = dict(self.config.parameters)
        if self.config.calibration is not None:
            data["calibration"] = dict(self.config.calibration)
        if self.method.random:
            data["seed"] = seed if seed is not None else 0
        return parse_recipe(data, source="ps decode")

    def _slice(self, values: dict, group: LayerGroup, first: bool, last: bool) -> dict[str, Any]:
        layer_range = [group.start, group.end]
        sources: list[dict[str, Any]] = []
        if self.base is not None:
            sources.append({"model": self.base.reference, "layer_range": layer_range})
        for i, src in enumerate(self.sources):
            sources.append(
                {
                    "model": src.reference,
                    "layer_range": layer_range,
                    "parameters": self._parameters(values, group, i, first=first, last=last),
                }
            )
        return {"sources": sources}
