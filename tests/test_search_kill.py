"""The real thing: SIGKILL `evomerge search` inside a generation, `evomerge resume`, and get the run an
uninterrupted search with the same seed produces, without recomputing anything journaled before the kill:
with pycma, and with each optuna sampler (whose RNGs a new process would otherwise reseed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from search_worker import make_models, write_space

from evomerge.run import read_journal
from evomerge.search import journal_genomes
from evomerge.search_cli import run_search

TESTS = Path(__file__).resolve().parent
POPSIZE = 6


def cli(*args: str, delay: float = 0.0, **popen) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "EVOMERGE_TEST_WORKER_DELAY": str(delay),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def search_ids(run_dir: Path) -> list[str]:
    """Search evaluations (and, with fidelity stages, stage evaluations) journaled so far."""
    return [r["eval_id"] for r in read_journal(run_dir / "journal.jsonl") if r["phase"] in ("search", "stage")]


OPTIMIZERS = {
    "cma": "",
    "optuna-tpe": "optimizer: {name: optuna, sampler: tpe, options: {n_startup_trials: 6}}",
    "optuna-cmaes": "optimizer: {name: optuna, sampler: cmaes}",
    "optuna-nsga2": "optimizer: {name: optuna, sampler: nsga2}\nobjectives: [{task: toy_add}, {task: toy_rev}]",
    "cma-fidelity": "fidelity: {stages: [20, 80]}",
}


SLOW = {"optuna-tpe", "optuna-nsga2"}  # test_optuna.py covers their exact continuation in-process


@pytest.mark.parametrize(
    "optimizer", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in OPTIMIZERS]
)
def test_sigkill_inside_a_generation_then_resume_equals_an_uninterrupted_run(tmp_path, optimizer):
    make_models(tmp_path / "models")
    log = tmp_path / "worker.log"
    path = write_space(
        tmp_path / "space.yaml",
        f"""\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.5}}, {{name: toy_rev, weight: 0.5}}]
budget: {{max_evals: 24, popsize: {POPSIZE}, select_top_k: 3}}
seed: 11
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "{log}", fail_above: 0.8}}}}
ps: {{method: dare_ties, granularity: 2, split_attn_mlp: true}}
{OPTIMIZERS[optimizer]}
""",
    )
    killed = tmp_path / "killed"
    proc = cli("search", str(path), "--run-dir", str(killed), delay=0.25)
    deadline = time.monotonic() + 90
    # kill three evaluations into the third generation (the second already drew from TPE's own RNG)
    while len([i for i in search_ids(killed) if i.startswith("g0002-")]) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the search did not reach the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before_kill = set(search_ids(killed))
    assert len([i for i in before_kill if i.startswith("g0002-")]) % POPSIZE != 0, "kill inside a generation"
    assert not (killed / "optimizer.pkl").exists()  # nothing but the journal carries the run over
    assert not (killed / "final.yaml").exists()
    log_lines_before = len(log.read_text().splitlines())

    resumed = cli("resume", str(killed))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    after_resume = [json.loads(line)["eval_id"] for line in log.read_text().splitlines()[log_lines_before:]]

    reference = tmp_path / "uninterrupted"
    run_search(path, reference, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)

    killed_records = list(read_journal(killed / "journal.jsonl"))
    reference_records = list(read_journal(reference / "journal.jsonl"))
    assert journal_genomes(killed_records) == journal_genomes(reference_records)
    assert len(journal_genomes(killed_records)) == 24
    assert [r["status"] for r in killed_records] == [r["status"] for r in reference_records]
    assert (killed / "final.yaml").read_text() == (reference / "final.yaml").read_text()
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (killed, reference))
    assert summary["final"]["test"] == expected["final"]["test"]
    assert "final (final.yaml) test score" in out
    if optimizer.startswith("optuna"):  # the study itself (what optuna-dashboard shows) is the same
        assert study_trials(killed) == study_trials(reference)
    if optimizer == "optuna-nsga2":
        assert (killed / "pareto.json").read_text() == (reference / "pareto.json").read_text()

    # nothing journaled before the kill reached a worker again; every eval id is journaled once
    assert after_resume and not set(after_resume) & before_kill
    ids = [r["eval_id"] for r in killed_records]
    assert len(ids) == len(set(ids))


def study_trials(run_dir: Path) -> list[tuple]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "study.log")))
    study = optuna.load_study(study_name="evomerge", storage=storage)
    return [(t.number, t.state, t.params, t.values) for t in study.trials]
