"""Genes: one named, bounded real per searchable quantity, laid out in a fixed order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Gene:
    """One coordinate of a genome. `name` is stable and readable (reports, heatmaps)."""

    name: str
    low: float
    high: float
    x0: float

    @property
    def span(self) -> float:
        return self.high - self.low


def check_genome(genome: Sequence[float], genes: Sequence[Gene]) -> list[float]:
    """The genome as plain floats, or an error naming the first coordinate that does not fit."""
    values = [float(v) for v in genome]
    if len(values) != len(genes):
        raise EvomergeError(f"genome: expected {len(genes)} genes, got {len(values)}")
    for value, gene in zip(values, genes, strict=True):
        if not gene.low <= value <= gene.high:
            raise EvomergeError(f"genome: gene {gene.name} = {value!r} is outside [{gene.low}, {gene.high}]")
    return values
