"""The real thing: SIGKILL `evomerge search` inside a generation, `evomerge resume`, SIGKILL the resume inside a
later generation, resume to the end, and get the run an uninterrupted search with the same seed produces (journal,
final recipe, summary, optuna study), without recomputing anything journaled: for every optimizer (optuna's
samplers would reseed their RNGs in a new process; resume replays the journal instead), with fidelity stages, and
across the two stages of PS+DFS.

The worker hangs on a chosen eval id (EVOMERGE_TEST_WORKER_HANG_AT), so each kill lands at a known point
mid-generation and no test waits on timed delays."""

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

from evomerge.cli.search import run_search
from evomerge.search.driver import journal_genomes
from evomerge.search.run import read_journal

TESTS = Path(__file__).resolve().parent
POPSIZE = 6
BASE = f"""\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.5}}, {{name: toy_rev, weight: 0.5}}]
budget: {{max_evals: 24, popsize: {POPSIZE}, select_top_k: 3}}
seed: 11
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "LOG", fail_above: 0.8}}}}
ps: {{method: dare_ties, granularity: 2, split_attn_mlp: true}}
"""
PS_DFS = f"""\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add}}]
budget: {{max_evals: 12, popsize: {POPSIZE}, select_top_k: 2}}
seed: 11
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "LOG"}}}}
ps: {{method: ties}}
dfs: {{repeats: 1, scales: model_pair, models: [models/b]}}
"""
# space, and where to kill: the journal being written and the eval id the worker hangs on, in the search
# and then in the first resume
GEN = [("journal.jsonl", "g0001-003"), ("journal.jsonl", "g0002-002")]
CASES = {
    "cma": (BASE, GEN),
    "random": (BASE + "optimizer: {name: random}\n", GEN),
    "optuna-tpe": (BASE + "optimizer: {name: optuna, sampler: tpe, options: {n_startup_trials: 6}}\n", GEN),
    "optuna-cmaes": (BASE + "optimizer: {name: optuna, sampler: cmaes}\n", GEN),
    "optuna-nsga2": (
        BASE + "optimizer: {name: optuna, sampler: nsga2}\nobjectives: [{task: toy_add}, {task: toy_rev}]\n",
        GEN,
    ),
    "cma-fidelity": (BASE + "fidelity: {stages: [20, 80]}\n", [(j, f"{i}/s0") for j, i in GEN]),
    "ps+dfs": (PS_DFS, [("ps/journal.jsonl", "g0001-003"), ("dfs/journal.jsonl", "g0000-003")]),
    "dfs": (
        PS_DFS.replace("ps: {method: ties}\n", "").replace("models: [models/b]", "models: [models/a, models/b]"),
        [("journal.jsonl", "g0000-003"), ("journal.jsonl", "g0001-002")],
    ),
}


def cli(*args: str, hang_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("EVOMERGE_TEST_WORKER_HANG_AT", None)
    if hang_at is not None:
        env["EVOMERGE_TEST_WORKER_HANG_AT"] = hang_at
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli.app", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_calls(log: Path) -> list[str]:
    """Eval ids the worker was called with, in order (a line still being written is left out)."""
    if not log.exists():
        return []
    lines = log.read_text().splitlines(keepends=True)
    return [json.loads(line)["eval_id"] for line in lines if line.endswith("\n")]


def killed_at(hang_at: str, log: Path, *args: str) -> None:
    """Run `evomerge *args` until its worker hangs on `hang_at`, then SIGKILL it."""
    start = len(worker_calls(log))
    proc = cli(*args, hang_at=hang_at)
    deadline = time.monotonic() + 120
    while hang_at not in worker_calls(log)[start:]:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the worker never reached {hang_at}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def journals(run_dir: Path) -> dict[str, list[dict]]:
    """Every journal of a run (PS+DFS: one per stage), without the wall-clock fields."""
    return {
        str(path.relative_to(run_dir)): [
            {k: v for k, v in r.items() if k not in ("time", "seconds")} for r in read_journal(path)
        ]
        for path in sorted(run_dir.rglob("journal.jsonl"))
    }


def unfinished_generation(journal: Path) -> bool:
    """The journal's newest generation has fewer search records than the population."""
    racing = [r for r in read_journal(journal) if r["phase"] in ("search", "stage")]
    newest = max(r["generation"] for r in racing)
    return sum(r["phase"] == "search" and r["generation"] == newest for r in racing) < POPSIZE


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_twice_then_resume_equals_an_uninterrupted_run(tmp_path, case):
    text, kills = CASES[case]
    make_models(tmp_path / "models")
    log = tmp_path / "worker.log"
    path = write_space(tmp_path / "space.yaml", text.replace("LOG", str(log)))
    run = tmp_path / "run"  # both runs live at this path in turn: recipes hold absolute paths (ps/model)
    run_search(path, run, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    reference = run.rename(tmp_path / "uninterrupted")
    evaluated = len(worker_calls(log))

    commands = (["search", str(path), "--run-dir", str(run)], ["resume", str(run)])
    for (journal, hang_at), command in zip(kills, commands, strict=True):
        killed_at(hang_at, log, *command)
        assert unfinished_generation(run / journal) and not (run / "final.yaml").exists()
    resumed = cli("resume", str(run))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "final (final.yaml) test score" in out

    # the same run, record for record; the worker ran what the uninterrupted run ran, plus the two
    # evaluations the kills cut short: nothing journaled before a kill was computed again
    assert journals(run) == journals(reference)
    for name in journals(run):
        genomes = journal_genomes(read_journal(run / name))
        assert genomes == journal_genomes(read_journal(reference / name))
        assert len(genomes) == (12 if "dfs" in case else 24)
    assert (run / "final.yaml").read_text() == (reference / "final.yaml").read_text()
    assert (run / "summary.json").read_text() == (reference / "summary.json").read_text()
    assert len(worker_calls(log)) == 2 * evaluated + 2
    assert not list(run.rglob("optimizer.pkl"))
    if case.startswith("optuna"):  # the study (what optuna-dashboard shows) is the same, and one study only
        assert study_trials(run) == study_trials(reference)
        summaries = optuna.get_all_study_summaries(study_storage(run))
        searched = [r for r in read_journal(run / "journal.jsonl") if r["phase"] == "search"]
        assert [(s.study_name, s.n_trials) for s in summaries] == [("evomerge", len(searched))]
    if case == "optuna-nsga2":
        assert (run / "pareto.json").read_text() == (reference / "pareto.json").read_text()


def study_storage(run_dir: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "study.log")))


def study_trials(run_dir: Path) -> list[tuple]:
    """The trials as optuna-dashboard shows them. CmaEsSampler's pickled CMA (`cma:optimizer:*`) is left out: it
    holds an RNG that the sampler reseeds before every ask, and its bytes differ even between two uninterrupted
    runs in one process."""
    study = optuna.load_study(study_name="evomerge", storage=study_storage(run_dir))
    return [
        (t.number, t.state, t.params, t.values, {k: v for k, v in t.system_attrs.items() if "cma:optimizer" not in k})
        for t in study.trials
    ]


@pytest.mark.slow
def test_sigkill_twice_with_real_merges_and_lm_eval_equals_an_uninterrupted_run(mini_zoo, tmp_path):
    """The same with the real fitness worker (real merges, lm-eval reseeding the global RNGs) and NSGA-II. The
    worker hangs on the eval id after the kill point, so the kill lands inside the generation however fast
    evaluations are."""
    path = write_space(
        tmp_path / "space.yaml",
        f"""\
models: [{mini_zoo}/add, {mini_zoo}/rev]
base_model: {mini_zoo}/base
tasks: [{{name: toy_add, weight: 0.5, limit: 20}}, {{name: toy_rev, weight: 0.5, limit: 20}}]
objectives: [{{task: toy_add}}, {{task: toy_rev}}]
budget: {{max_evals: 24, popsize: {POPSIZE}, select_top_k: 2}}
optimizer: {{name: optuna, sampler: nsga2}}
worker: {{factory: "search_worker:hanging_fitness_worker"}}
ps: {{method: task_arithmetic, genes: {{weight: [0.0, 1.5]}}}}
""",
    )
    run = tmp_path / "run"
    run_search(path, run, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    reference = run.rename(tmp_path / "uninterrupted")

    def journaled() -> set[str]:
        return {r["eval_id"] for r in read_journal(run / "journal.jsonl")}

    kills = (
        ("g0001-002", "g0001-003", ["search", str(path), "--run-dir", str(run)]),
        ("g0002-001", "g0002-002", ["resume", str(run)]),
    )
    for last, hang_at, command in kills:
        proc = cli(*command, hang_at=hang_at)
        deadline = time.monotonic() + 300
        while last not in journaled():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the search never journaled {last}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert unfinished_generation(run / "journal.jsonl") and not (run / "final.yaml").exists()
    resumed = cli("resume", str(run))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err

    assert journals(run) == journals(reference)
    for name in ("final.yaml", "summary.json", "pareto.json"):
        assert (run / name).read_text() == (reference / name).read_text()
    assert study_trials(run) == study_trials(reference)


def test_a_second_process_on_a_running_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    make_models(tmp_path / "models")
    log = tmp_path / "worker.log"
    path = write_space(tmp_path / "space.yaml", BASE.replace("LOG", str(log)))
    run = tmp_path / "run"
    first = cli("search", str(path), "--run-dir", str(run), hang_at="g0000-002")
    deadline = time.monotonic() + 120
    while "g0000-002" not in worker_calls(log):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the worker never reached g0000-002"
        time.sleep(0.02)
    for command in (["resume", str(run)], ["search", str(path), "--run-dir", str(run)]):
        second = cli(*command)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert err.count("\n") == 1, err
        if command[0] == "resume":
            assert f"in use by `evomerge search` (pid {first.pid} on " in err and f"kill {first.pid}" in err
        else:
            assert "already holds a run" in err
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    resumed = cli("resume", str(run))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"took over the lock of `evomerge search` (pid {first.pid}" in err
    records = list(read_journal(run / "journal.jsonl"))
    ids = [r["eval_id"] for r in records]
    assert len(ids) == len(set(ids)) and sum(r["phase"] == "search" for r in records) == 24
    assert (run / ".lock").read_text() == ""  # released at the end: no holder to report


def test_ps_dfs_results_do_not_depend_on_the_run_directory(tmp_path):
    """The same space and seed at two paths: the same genomes, fitnesses and final recipe (up to
    the run's own path, which the DFS stage's recipes name as the PS model)."""
    make_models(tmp_path / "models")
    path = write_space(tmp_path / "space.yaml", PS_DFS.replace("LOG", str(tmp_path / "worker.log")))
    runs = [tmp_path / "one", tmp_path / "elsewhere" / "deeper" / "two"]
    for run in runs:
        run_search(path, run, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)

    def normalized(run: Path) -> dict[str, list]:
        out = {}
        for name in journals(run):
            records = read_journal(run / name)
            out[name] = [
                (r["eval_id"], r["genome"], r["fitness"], r["recipe"].replace(str(run.resolve()), "RUN"))
                for r in records
                if r["phase"] == "search"
            ]
        return out

    assert normalized(runs[0]) == normalized(runs[1])
    finals = [(run / "final.yaml").read_text().replace(str(run.resolve()), "RUN") for run in runs]
    assert finals[0] == finals[1]
