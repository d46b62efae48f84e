"""The real thing: SIGKILL `evomerge search` inside a generation, `evomerge resume`, and get the run an
uninterrupted search with the same seed produces, without recomputing anything journaled before the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from search_worker import make_models, write_space

from evomerge.run import RunDir, read_journal
from evomerge.search import journal_genomes
from evomerge.search_cli import run_search

TESTS = Path(__file__).resolve().parent
POPSIZE = 6


def cli(*args: str, delay: float = 0.0, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "EVOMERGE_TEST_WORKER_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def search_ids(run_dir: Path) -> list[str]:
    return [r["eval_id"] for r in read_journal(run_dir / "journal.jsonl") if r["phase"] == "search"]


def test_sigkill_inside_a_generation_then_resume_equals_an_uninterrupted_run(tmp_path):
    make_models(tmp_path / "models")
    log = tmp_path / "worker.log"
    path = write_space(tmp_path / "space.yaml", f"""\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.5}}, {{name: toy_rev, weight: 0.5}}]
budget: {{max_evals: 24, popsize: {POPSIZE}, select_top_k: 3}}
seed: 11
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "{log}", fail_above: 0.8}}}}
ps: {{method: dare_ties, granularity: 2, split_attn_mlp: true}}
""")
    killed = tmp_path / "killed"
    proc = cli("search", str(path), "--run-dir", str(killed), delay=0.25)
    kill_at = POPSIZE + 3  # three evaluations into the second generation
    deadline = time.monotonic() + 90
    while len(search_ids(killed)) < kill_at:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the search did not reach the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before_kill = set(search_ids(killed))
    assert len(before_kill) % POPSIZE != 0, "the kill must land inside a generation"
    checkpoint = RunDir(killed).load_checkpoint()
    assert checkpoint.pending is not None  # asked, not yet told
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

    # nothing journaled before the kill reached a worker again; every eval id is journaled once
    assert after_resume and not set(after_resume) & before_kill
    ids = [r["eval_id"] for r in killed_records]
    assert len(ids) == len(set(ids))
