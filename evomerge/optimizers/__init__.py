"""Optimizer adapters behind one ask/tell contract; `make_optimizer` picks one from the space."""

from __future__ import annotations

from evomerge.optimizers.base import AskTellOptimizer


def make_optimizer(space, seed: int) -> AskTellOptimizer:
    """The optimizer a bound `SearchSpace` asks for, seeded with `seed` (derived from the run seed)."""
    spec = space.config.optimizer
    if spec.name == "cma":
        from evomerge.optimizers.cma_es import CMAOptimizer

        return CMAOptimizer(space.x0, space.config.budget.sigma0, lower=space.lower, upper=space.upper,
                            stds=space.stds, popsize=space.popsize, seed=seed, options=spec.options)
    if spec.name == "random":
        from evomerge.optimizers.random_search import RandomSearch

        return RandomSearch(lower=space.lower, upper=space.upper, popsize=space.popsize, seed=seed)
    raise ValueError(f"unknown optimizer {spec.name!r}")  # unreachable: the config validates the name


__all__ = ["AskTellOptimizer", "make_optimizer"]
