"""pycma's CMA-ES behind the ask/tell contract, with bounds, per-gene step sizes and its own RNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.search.optimizers.base import AskTellOptimizer

# Options the space owns; user options may not override them, or the run would not match its space.
_RESERVED = {"bounds", "popsize", "seed", "randn", "CMA_stds", "verbose", "maxfevals"}


class CMAOptimizer(AskTellOptimizer):
    """`cma.CMAEvolutionStrategy` minimizing -fitness.

    Bounds go to pycma (its BoundTransform keeps every asked genome feasible; nothing is clipped
    afterwards). `stds` scales sigma0 per gene, so sigma0 is a fraction of each gene's range.
    The ES samples from a private `RandomState(seed)`, so the same seed and the same tells give the
    same genomes in any process (what resume replays) and the process-global numpy RNG never touches
    the search (reference/stack.md §6)."""

    name = "cma"

    def __init__(
        self,
        x0: Sequence[float],
        sigma0: float,
        *,
        lower: Sequence[float],
        upper: Sequence[float],
        stds: Sequence[float],
        popsize: int,
        seed: int,
        options: Mapping[str, Any] | None = None,
    ):
        import cma

        clash = _RESERVED & set(options or {})
        if clash:
            raise EvomergeError(
                f"optimizer.options: {', '.join(sorted(clash))} are set by the search space "
                "(budget, genes, seed); remove them here"
            )
        opts: dict[str, Any] = {
            "bounds": [list(lower), list(upper)],
            "popsize": int(popsize),
            "seed": int(seed),
            "randn": np.random.RandomState(seed).randn,
            "CMA_stds": list(stds),
            "verbose": -9,
            "maxfevals": float("inf"),
            **dict(options or {}),
        }
        try:
            self.es = cma.CMAEvolutionStrategy(list(x0), float(sigma0), opts)
        except (ValueError, TypeError) as exc:
            reason = " ".join(str(exc).split("Valid options are")[0].split())  # pycma appends all ~80 names
            raise EvomergeError(f"optimizer.options: pycma rejected the options: {reason}") from None
        self._told = 0

    def ask(self) -> list[list[float]]:
        return [[float(v) for v in x] for x in self.es.ask()]

    def tell(self, genomes: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        self.es.tell([np.asarray(g, dtype=float) for g in genomes], [-float(f) for f in fitnesses])
        self._told += 1

    @property
    def generation(self) -> int:
        return self._told
