"""Uniform random search in the gene bounds: the baseline every search result is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evomerge.search.optimizers.base import AskTellOptimizer


class RandomSearch(AskTellOptimizer):
    """Draws `popsize` genomes per generation uniformly inside the bounds; learns nothing.

    Its RNG is its own `RandomState(seed)`, so a replay of the journal re-asks the same genomes."""

    name = "random"

    def __init__(self, *, lower: Sequence[float], upper: Sequence[float], popsize: int, seed: int):
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.popsize = int(popsize)
        self.rng = np.random.RandomState(seed)
        self._told = 0

    def ask(self) -> list[list[float]]:
        draws = self.rng.uniform(self.lower, self.upper, size=(self.popsize, len(self.lower)))
        return [[float(v) for v in row] for row in draws]

    def tell(self, genomes: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        self._told += 1

    @property
    def generation(self) -> int:
        return self._told
