"""optuna samplers (TPE, CMA-ES, NSGA-II) behind the ask/tell contract, replayable from the journal.

The study lives in the run directory as optuna's journal file (`study.log`), which
`optuna-dashboard runs/NAME/study.log` opens. Trials are asked in batches of `popsize` with one
fixed `FloatDistribution` per gene, so every trial has the same search space.

`study.log` is derived data, never read back: optuna keeps part of its state in the sampler object
(its RNGs, which a new process would reseed, so loading the old study and asking on would continue
differently), so on every start the file is replaced by a new study and the driver replays the
evomerge journal into it (evomerge/search/driver.py). The same asks and tells in the same order, each
generation's trials RUNNING while they are asked, give the same trial numbers, sampler RNG states
and stored CMA-ES states as the original run, and the rebuilt file again holds every trial under one
study (so no DuplicatedStudyError, and no stale or crafted bytes of an old file reach optuna).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.samplers import CmaEsSampler

from evomerge.errors import EvomergeError
from evomerge.search.optimizers.base import AskTellOptimizer

STUDY_FILE = "study.log"
# Sampler arguments the space sets (seed, population, start point); options may not override them.
_RESERVED = {
    "tpe": {"seed"},
    "nsga2": {"seed", "population_size"},
    "cmaes": {"seed", "popsize", "x0", "sigma0", "n_startup_trials"},
}


class OptunaOptimizer(AskTellOptimizer):
    """An optuna study driven with `study.ask(fixed_distributions)` / `study.tell`.

    `directions` has one entry per objective: tell gets floats (one objective) or one vector per
    genome, None marking a failed evaluation (told as a failed trial, which samplers skip)."""

    name = "optuna"

    def __init__(
        self,
        *,
        sampler: str,
        names: Sequence[str],
        lower: Sequence[float],
        upper: Sequence[float],
        x0: Sequence[float],
        sigma0: float,
        popsize: int,
        seed: int,
        directions: Sequence[str],
        study_name: str,
        run_dir: Path | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        clash = _RESERVED[sampler] & set(options or {})
        if clash:
            raise EvomergeError(
                f"optimizer.options: {', '.join(sorted(clash))} are set by the search space "
                "(budget, genes, seed); remove them here"
            )
        self.sampler_name = sampler
        self.names = list(names)
        self.lower, self.upper = [float(v) for v in lower], [float(v) for v in upper]
        self.popsize = int(popsize)
        self.directions = list(directions)
        self.study_name = study_name
        self.sampler = _make_sampler(
            sampler,
            dict(options or {}),
            seed=seed,
            popsize=self.popsize,
            space=self.distributions(),
            x0=dict(zip(self.names, x0, strict=True)),
            sigma0=sigma0,
        )
        self.pending: list[int] = []  # trial numbers asked and not yet told
        self._told = 0
        self.study = self._new_study(run_dir)

    @property
    def objectives(self) -> int:  # type: ignore[override]
        return len(self.directions)

    def _new_study(self, run_dir: Path | None) -> Any:
        """A new, empty study: in `run_dir/study.log` (whatever was there is deleted unread), or in
        memory without a run directory."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage: Any = None
        if run_dir is not None:
            path = Path(run_dir) / STUDY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            Path(f"{path}.lock").unlink(missing_ok=True)  # a lock a killed run left behind; one writer
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            return optuna.create_study(
                storage=storage, sampler=self.sampler, study_name=self.study_name, directions=self.directions
            )

    # -- ask / tell -------------------------------------------------------------------------------------

    def distributions(self) -> dict[str, Any]:
        """One bounded float per gene, the same for every trial (what makes ask/tell batches work)."""
        import optuna

        return {
            n: optuna.distributions.FloatDistribution(lo, hi)
            for n, lo, hi in zip(self.names, self.lower, self.upper, strict=True)
        }

    def ask(self) -> list[list[float]]:
        distributions = self.distributions()
        genomes = []
        self.pending = []
        for _ in range(self.popsize):
            trial = self.study.ask(fixed_distributions=distributions)
            self.pending.append(trial.number)
            genomes.append([float(trial.params[n]) for n in self.names])
        return genomes

    def tell(self, genomes: Sequence[Sequence[float]], fitnesses: Sequence[Any]) -> None:
        from optuna.trial import TrialState

        if len(fitnesses) != len(self.pending):
            raise ValueError(f"told {len(fitnesses)} values for {len(self.pending)} pending trials")
        for number, value in zip(self.pending, fitnesses, strict=True):
            if value is None:
                self.study.tell(number, state=TrialState.FAIL)
            else:
                self.study.tell(number, [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value))
        self.pending = []
        self._told += 1

    @property
    def generation(self) -> int:
        return self._told


def _make_sampler(
    name: str,
    options: dict[str, Any],
    *,
    seed: int,
    popsize: int,
    space: dict[str, Any],
    x0: dict[str, float],
    sigma0: float,
) -> Any:
    import optuna

    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **options)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=popsize, **options)
        # x0 and sigma0 are deprecated since optuna 4.9 with no replacement (optuna PR #6624; removal planned
        # for 6.0): optuna 5 has no other public way to start CMA-ES at the space's x0 with its sigma0.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            return KnownSpaceCmaEs(
                space=space, x0=x0, sigma0=sigma0, popsize=popsize, seed=seed, n_startup_trials=0, **options
            )
    except TypeError as exc:
        raise EvomergeError(f"optimizer.options: the {name} sampler rejected them: {exc}") from None


class KnownSpaceCmaEs(CmaEsSampler):
    """CmaEsSampler that knows the (fixed) search space before any trial completes.

    The stock sampler infers the space from completed trials, so a whole first batch asked before
    any tell is sampled independently at random (its cold start). Every trial here asks the same
    fixed distributions, so the space is given up front and generation 0 already samples CMA-ES
    around x0 with sigma0 (the same start as pycma)."""

    def __init__(self, *, space: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.known_space = dict(space)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return dict(self.known_space)
