"""The ask/tell contract every optimizer adapter follows (pycma, random search, optuna samplers).

The driver asks for one generation of genomes, evaluates them, and tells the fitnesses back in
the order asked; fitness is *maximized* (an adapter over a minimizer negates it). Resuming a run
replays the journal through a fresh adapter (evomerge/search/driver.py), so an adapter must be a
deterministic function of its seed and the asks and tells it has seen: it owns every random state
it draws from, so nothing else in the process (lm-eval reseeding the global RNGs, for one) can
change its trajectory, and it saves nothing of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class AskTellOptimizer(ABC):
    name: str = "optimizer"
    objectives: int = 1  # >1: tell gets one objective vector per genome (None: failed) instead of floats

    @abstractmethod
    def ask(self) -> list[list[float]]:
        """One generation of genomes inside the bounds (plain floats)."""

    @abstractmethod
    def tell(self, genomes: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        """The fitness (higher is better) of each genome of the last `ask`, in the same order."""

    @property
    @abstractmethod
    def generation(self) -> int:
        """Generations told so far."""
