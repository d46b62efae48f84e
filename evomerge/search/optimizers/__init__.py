"""Optimizer adapters behind one ask/tell contract; `make_optimizer` picks one from the space."""

from __future__ import annotations

from pathlib import Path

from evomerge.search.optimizers.base import AskTellOptimizer


def make_optimizer(space, seed: int, run_dir: Path | None = None) -> AskTellOptimizer:
    """The optimizer a bound `SearchSpace` asks for, seeded with `seed` (derived from the run seed);
    optimizers that keep files (the optuna study, rebuilt on every start) keep them in `run_dir`."""
    spec = space.config.optimizer
    if spec.name == "optuna":
        from evomerge.search.objectives import objective_directions
        from evomerge.search.optimizers.optuna_sampler import OptunaOptimizer

        multi = spec.sampler in ("tpe", "nsga2") and space.config.objectives
        return OptunaOptimizer(
            sampler=spec.sampler,
            names=space.names,
            lower=space.lower,
            upper=space.upper,
            x0=space.x0,
            sigma0=space.config.budget.sigma0,
            popsize=space.popsize,
            seed=seed,
            directions=objective_directions(space.config) if multi else ["maximize"],
            study_name=space.config.name or "evomerge",
            run_dir=run_dir,
            options=spec.options,
        )
    if spec.name == "cma":
        from evomerge.search.optimizers.cma_es import CMAOptimizer

        return CMAOptimizer(
            space.x0,
            space.config.budget.sigma0,
            lower=space.lower,
            upper=space.upper,
            stds=space.stds,
            popsize=space.popsize,
            seed=seed,
            options=spec.options,
        )
    if spec.name == "random":
        from evomerge.search.optimizers.random_search import RandomSearch

        return RandomSearch(lower=space.lower, upper=space.upper, popsize=space.popsize, seed=seed)
    raise ValueError(f"unknown optimizer {spec.name!r}")  # unreachable: the config validates the name


__all__ = ["AskTellOptimizer", "make_optimizer"]
