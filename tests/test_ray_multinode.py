"""A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster: a head and a second node,
each its own raylet with its own resources): a search with --ray-address spreads its workers over
both nodes, and when the second node is removed mid-run the run completes on the head, the
candidate that was running there is run again, and nothing is journaled twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from search_worker import make_models, write_space

from evomerge.search.run import read_journal

TESTS = Path(__file__).resolve().parent
SPACE = """\
models: [models/a, models/b]
base_model: models/base
tasks: [{{name: toy_add, weight: 0.5}}, {{name: toy_rev, weight: 0.5}}]
budget: {{max_evals: 24, popsize: 6, select_top_k: 2}}
seed: 3
worker: {{factory: "search_worker:ToyFitnessWorker", kwargs: {{log: "{log}"}}}}
ps: {{method: ties}}
"""


@pytest.mark.slow
def test_a_search_spreads_over_two_nodes_and_survives_losing_one(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # nodes (and the workers they start) inherit this environment: the test worker must import,
    # and each evaluation takes a while so that the second node is busy when it goes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("EVOMERGE_TEST_WORKER_DELAY", "0.2")
    hang = tmp_path / "hang_on_node"  # every candidate the second node takes hangs there until it is removed
    monkeypatch.setenv("EVOMERGE_TEST_WORKER_HANG_ON_NODE_FILE", str(hang))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    head_id, second_id = cluster.head_node.node_id, second.node_id
    hang.write_text(second_id)
    try:
        make_models(tmp_path / "models")
        log = tmp_path / "worker.log"
        space = write_space(tmp_path / "space.yaml", SPACE.format(log=log))
        run = tmp_path / "run"
        search = subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli.app", "search", str(space), "--run-dir", str(run)]
            + ["--ray-address", cluster.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180
        while len({c["node"] for c in calls(log)}) < 2:
            assert search.poll() is None, search.communicate()
            assert time.monotonic() < deadline, f"evaluations so far: {calls(log)}"
            time.sleep(0.2)
        # one worker per node (SPREAD), not both on the head
        assert {c["node"] for c in calls(log)} == {head_id, second_id}
        before = len(calls(log))
        cluster.remove_node(second, allow_graceful=False)
        out, err = search.communicate(timeout=300)
        assert search.returncode == 0, err
        assert "final (final.yaml) test score" in out
    finally:
        cluster.shutdown()
    records = list(read_journal(run / "journal.jsonl"))
    ids = [r["eval_id"] for r in records]
    assert len(ids) == len(set(ids))  # nothing journaled twice
    assert sum(r["phase"] == "search" for r in records) == 24
    assert all(r["status"] == "ok" for r in records if r["phase"] == "search"), records
    ids = [c["eval_id"] for c in calls(log)]
    assert len(ids) > len(set(ids)), "no candidate was run again after the node went away"
    assert {c["node"] for c in calls(log)[before + 1 :]} == {head_id}


def calls(log: Path) -> list[dict]:
    """The evaluations the workers started (a line still being written is left out)."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines(keepends=True) if line.endswith("\n")]
