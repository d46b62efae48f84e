"""The optuna back end: ask/tell batches over fixed distributions, the study file, the CMA-ES cold start, and
an exact continuation by replay: a fresh optimizer re-asked and re-told the journaled generations continues
as the original would have, in a study.log rebuilt from scratch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from search_worker import make_models

from evomerge.errors import EvomergeError
from evomerge.search.optimizers import make_optimizer
from evomerge.search.optimizers.optuna_sampler import STUDY_FILE
from evomerge.search.space import SearchSpace, parse_space

SAMPLERS = [("tpe", []), ("cmaes", []), ("nsga2", [{"task": "toy_add"}, {"task": "toy_rev"}])]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("optuna")
    make_models(root / "models")
    return root


def bound_space(root: Path, sampler: str, objectives: list, **optimizer) -> SearchSpace:
    config = parse_space(
        {
            "models": ["models/a", "models/b"],
            "base_model": "models/base",
            "tasks": [{"name": "toy_add"}, {"name": "toy_rev"}],
            "objectives": objectives,
            "budget": {"max_evals": 30, "popsize": 6},
            "seed": 5,
            "optimizer": {"name": "optuna", "sampler": sampler, **optimizer},
            "ps": {"method": "dare_ties", "granularity": 2},
        }
    )
    return SearchSpace(config, root=root)


def values(genomes: list[list[float]], objectives: int) -> list:
    """A deterministic landscape: one fitness, or two competing objectives."""
    out = []
    for g in genomes:
        x = np.asarray(g)
        first, second = -float(np.sum((x - 0.3) ** 2)), -float(np.sum((x - 0.7) ** 2))
        out.append([first, second] if objectives > 1 else first)
    return out


def generations(optimizer, count: int) -> list[list[list[float]]]:
    asked = []
    for _ in range(count):
        genomes = optimizer.ask()
        optimizer.tell(genomes, values(genomes, optimizer.objectives))
        asked.append(genomes)
    return asked


@pytest.mark.parametrize("sampler,objectives", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_a_replay_continues_exactly_after_an_untold_ask(models, tmp_path, sampler, objectives):
    space = bound_space(models, sampler, objectives)
    reference = generations(make_optimizer(space, 17, tmp_path / "ref"), 5)

    run = tmp_path / "killed"
    optimizer = make_optimizer(space, 17, run)
    told = generations(optimizer, 2)
    untold = optimizer.ask()  # a generation asked (its trials RUNNING in the study) and never told
    del optimizer  # the process dies

    resumed = make_optimizer(space, 17, run)  # what resume does: a fresh optimizer, a new study.log ...
    for genomes in told:  # ... re-asked and re-told what the journal holds
        assert resumed.ask() == genomes
        resumed.tell(genomes, values(genomes, resumed.objectives))
    assert resumed.ask() == untold
    resumed.tell(untold, values(untold, resumed.objectives))
    assert told + [untold] + generations(resumed, 2) == reference
    # what optuna-dashboard reads: one study, every trial told once (none left RUNNING by the dead process)
    assert len(optuna.get_all_study_summaries(_storage(run))) == 1
    study = optuna.load_study(study_name="evomerge", storage=_storage(run))
    assert len(study.trials) == 5 * 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_a_new_sampler_on_the_old_study_does_not_continue_exactly(models, tmp_path):
    """Why resume replays instead of loading study.log: optuna's own resume (the same seed, the stored
    study) restarts the sampler's RNG, so TPE asks other genomes than the uninterrupted run."""
    space = bound_space(models, "tpe", [])
    reference = generations(make_optimizer(space, 17, tmp_path / "ref"), 5)
    run = tmp_path / "naive"
    first = generations(make_optimizer(space, 17, run), 3)  # TPE proper (its own RNG) from generation 2
    sampler = make_optimizer(space, 17).sampler  # a sampler as new, with the same seed
    study = optuna.load_study(study_name="evomerge", storage=_storage(run), sampler=sampler)
    continued = []
    for _ in range(2):
        trials = [study.ask(bound_distributions(space)) for _ in range(6)]
        genomes = [[t.params[n] for n in space.names] for t in trials]
        for trial, value in zip(trials, values(genomes, 1), strict=True):
            study.tell(trial, value)
        continued.append(genomes)
    assert first + continued != reference
    assert first == reference[:3] and all(len(g) == 6 for g in continued)


def bound_distributions(space: SearchSpace) -> dict:
    return {
        n: optuna.distributions.FloatDistribution(lo, hi)
        for n, lo, hi in zip(space.names, space.lower, space.upper, strict=True)
    }


def test_cmaes_samples_cma_generations_from_the_first_batch_around_x0(models, tmp_path):
    space = bound_space(models, "cmaes", [])
    optimizer = make_optimizer(space, 3, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stock sampler warns about independent sampling here
        asked = generations(optimizer, 2)
    trials = optimizer.study.trials
    assert [t.system_attrs.get("cma:generation") for t in trials] == [0] * 6 + [1] * 6
    first = np.asarray(asked[0])
    spread = (np.asarray(space.upper) - np.asarray(space.lower)) * space.config.budget.sigma0
    assert np.all(np.abs(first - np.asarray(space.x0)) < 4 * spread)  # CMA around x0, not uniform


def test_options_reach_the_sampler_and_reserved_ones_are_refused(models, tmp_path):
    optimizer = make_optimizer(bound_space(models, "tpe", [], options={"n_startup_trials": 3}), 1, tmp_path / "a")
    assert optimizer.sampler._n_startup_trials == 3  # noqa: SLF001
    with pytest.raises(EvomergeError, match="optimizer.options: seed"):
        make_optimizer(bound_space(models, "tpe", [], options={"seed": 1}), 1, tmp_path / "b")
    with pytest.raises(EvomergeError, match="optimizer.options: the tpe sampler rejected"):
        make_optimizer(bound_space(models, "tpe", [], options={"no_such": 1}), 1, tmp_path / "c")


def _storage(run: Path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / STUDY_FILE)))
