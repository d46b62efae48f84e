"""Data-flow-space (DFS) genes, the inference path they select, and its export as a passthrough recipe.

Layout (Akiba et al. 2024): the layers of the DFS models in order (model 1's, then model 2's, ...),
repeated `r` times; one indicator gene per slot, the slot is on the path iff its gene is > 0.
With `anchor_layers` the anchor model's first and last layers are fixed as the path's ends, so the
exported model takes the anchor's embeddings, final norm and head. Every transition that is not
a model's own next layer (layer i of model a -> layer i+1 of a, the flow it was trained on, kept
at scale 1) multiplies the hidden state entering the new layer by a scale gene `s_t`: the paper's
W_ij over all M x M layer pairs (`layer_pair`; the successor entries fixed to 1), or one gene per
(model, model) pair (`model_pair`, W_ij = w[model(i), model(j)]), where (a, a) is a jump inside
model a (a skip, or a repeat of earlier layers).

Export. A stacked model cannot scale its residual stream, but pre-norm decoders make that scale
foldable: with c_t = prod_{k<=t} s_k (all > 0), running the path with scaled inputs equals running
it on h / c_t with each step's branch outputs (attention output and MLP down projections) scaled by
1 / c_t, because RMSNorm / LayerNorm ignore a positive scale of their input (exactly, but for the
norm's epsilon), and the final norm removes c_T. So the path becomes `slices:` of `passthrough`
with `scale: 1/c_t` filtered onto the output projections; consecutive layers of one model with the
same c_t share a slice. `path_from_recipe` undoes the fold (the materializer's view).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.jobs import ModelInfo
from evomerge.merge.recipe import Recipe, evaluate_setting, parse_recipe
from evomerge.search.space.config import DFSConfig
from evomerge.search.space.genes import Gene
from evomerge.search.space.ps import model_labels

SCALE_DECIMALS = 6  # scale genes are rounded like PS values, so recipes read well and dedupe


@dataclass(frozen=True)
class Step:
    """One layer of the path: `scale` multiplies the hidden state entering it (1 within a model)."""

    model: int
    layer: int
    scale: float = 1.0


class DFSLayout:
    def __init__(self, config: DFSConfig, sources: Sequence[ModelInfo], anchor: int, sigma0: float):
        self.config = config
        self.sources = list(sources)
        self.anchor = anchor
        family = self.sources[0].arch.family
        for info in self.sources:
            if info.arch.family != family:
                raise EvomergeError(
                    f"dfs.models: {info.reference!r} is a {info.arch.family} model but "
                    f"{self.sources[0].reference!r} is {family}; a path needs one architecture"
                )
        # The tensors that write into the residual stream (the family's data file) carry the scales.
        self.projections = self.sources[0].arch.residual_outputs
        if not self.projections:
            raise EvomergeError(f"dfs.models: no scale export for the {family} family (no residual_outputs)")
        self.labels = model_labels([s.reference for s in self.sources])
        self.slots = [
            (rep, m, layer)
            for rep in range(config.repeats)
            for m, info in enumerate(self.sources)
            for layer in range(info.num_layers)
        ]
        self.pairs = self._scale_keys()
        self.genes = self._indicator_genes(sigma0) + self._scale_genes()

    def _scale_keys(self) -> list[tuple[Any, ...]]:
        n = len(self.sources)
        if self.config.scales == "model_pair":
            return [(a, b) for a in range(n) for b in range(n)]
        return [
            (a, i, b, j)
            for a in range(n)
            for b in range(n)
            for i in range(self.sources[a].num_layers)
            for j in range(self.sources[b].num_layers)
            if not (a == b and j == i + 1)
        ]

    def _indicator_genes(self, sigma0: float) -> list[Gene]:
        low, high = self.config.indicator_bounds
        on = self.config.indicator_on
        if on is None:
            on = min(high, 2 * sigma0 * (high - low))  # the paper's 2 sigma
        ends = (0, self.sources[self.anchor].num_layers - 1) if self.config.anchor_layers else ()
        genes = []
        for rep, m, layer in self.slots:
            # x0 = the anchor model alone: its first repeat is on, except the fixed end layers
            x0 = on if (rep == 0 and m == self.anchor and layer not in ends) else self.config.indicator_off
            genes.append(Gene(f"I.r{rep}.{self.labels[m]}.{layer}", low, high, x0))
        return genes

    def _scale_genes(self) -> list[Gene]:
        low, high = self.config.scale_bounds
        x0 = min(max(1.0, low), high)
        names = []
        for key in self.pairs:
            if len(key) == 2:
                names.append(f"W.{self.labels[key[0]]}->{self.labels[key[1]]}")
            else:
                a, i, b, j = key
                names.append(f"W.{self.labels[a]}.{i}->{self.labels[b]}.{j}")
        return [Gene(n, low, high, x0) for n in names]

    # -- decoding --------------------------------------------------------------------------------

    def path(self, genome: Sequence[float]) -> list[Step]:
        """The layers the genome selects, in order, with the input scale of each."""
        n_slots = len(self.slots)
        indicators, scales = genome[:n_slots], genome[n_slots:]
        scale_of = {key: round(float(v), SCALE_DECIMALS) for key, v in zip(self.pairs, scales, strict=True)}
        chosen = [(m, layer) for (_rep, m, layer), g in zip(self.slots, indicators, strict=True) if g > 0]
        if self.config.anchor_layers:
            last = self.sources[self.anchor].num_layers - 1
            chosen = [(self.anchor, 0), *chosen, (self.anchor, last)]
        limit = self.config.max_path_length
        if limit is not None and len(chosen) > limit:
            chosen = chosen[: limit - 1] + [chosen[-1]] if self.config.anchor_layers and limit >= 2 else chosen[:limit]
        if not chosen:
            raise EvomergeError("genome: the DFS path is empty (no indicator gene is > 0)")
        steps = [Step(*chosen[0])]
        for (pm, pl), (m, layer) in zip(chosen, chosen[1:], strict=False):
            if m == pm and layer == pl + 1:
                steps.append(Step(m, layer))
            else:
                key = (pm, m) if self.config.scales == "model_pair" else (pm, pl, m, layer)
                steps.append(Step(m, layer, scale_of[key]))
        return steps

    def decode(self, genome: Sequence[float]) -> Recipe:
        return path_to_recipe(self.path(genome), [s.reference for s in self.sources], self.projections)


def path_to_recipe(steps: Sequence[Step], models: Sequence[str], projections: Sequence[str]) -> Recipe:
    """A passthrough `slices:` recipe equal to running `steps` (scales folded, see module doc)."""
    slices: list[dict[str, Any]] = []
    cumulative = 1.0
    run: dict[str, Any] | None = None
    for step in steps:
        cumulative *= step.scale
        if not 0.0 < cumulative < math.inf:  # scales near the float limits, multiplied along the path
            raise EvomergeError(f"genome: the DFS path's scales multiply to {cumulative}; narrow dfs.scale_bounds")
        out_scale = 1.0 / cumulative
        if (
            run is not None
            and run["model"] == step.model
            and run["end"] == step.layer
            and run["out_scale"] == out_scale
        ):
            run["end"] += 1
            continue
        run = {"model": step.model, "start": step.layer, "end": step.layer + 1, "out_scale": out_scale}
        slices.append(run)
    data = {"merge_method": "passthrough", "slices": [_slice(r, models, projections) for r in slices]}
    return parse_recipe(data, source="dfs decode")


def _slice(run: dict[str, Any], models: Sequence[str], projections: Sequence[str]) -> dict[str, Any]:
    source: dict[str, Any] = {"model": models[run["model"]], "layer_range": [run["start"], run["end"]]}
    if run["out_scale"] != 1.0:
        source["parameters"] = {"scale": [{"filter": p, "value": run["out_scale"]} for p in projections]}
    return {"sources": [source]}


def path_from_recipe(recipe: Recipe, projections: Sequence[str]) -> list[tuple[str, int, float]]:
    """(model, layer, input scale) per path step of a passthrough recipe written by `path_to_recipe`:
    the input scale of step t is c_t / c_{t-1}, read back from the folded output scales 1 / c_t."""
    if recipe.merge_method != "passthrough" or not recipe.slices:
        raise EvomergeError("recipe: not a passthrough slices recipe (not a DFS path)")
    steps: list[tuple[str, int, float]] = []
    previous = 1.0
    probe = f"x.{projections[0]}.weight"
    for output_slice in recipe.slices:
        source = output_slice.sources[0]
        setting = (source.parameters or {}).get("scale")
        value = evaluate_setting(setting, probe, 0.0) if setting is not None else None
        cumulative = 1.0 / float(value) if value is not None else 1.0
        start, end = source.layer_range
        for layer in range(start, end):
            steps.append((source.model, layer, cumulative / previous))
            previous = cumulative
    return steps
