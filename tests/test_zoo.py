"""The toy zoo: real training, real files, real reloads, real lm-eval runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.paths import tasks_dir
from evomerge.toy_tasks import EXPERT_TASKS, SPLIT_SIZES, TASKS, make_splits, read_split

MODEL_DIRS = ["base", "add", "rev", "shift"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_manifest_shape(mini_zoo: Path) -> None:
    manifest = json.loads((mini_zoo / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["tasks"] == EXPERT_TASKS
    assert manifest["build_seconds"] > 0 and manifest["mini"] is True  # timing: benchmarks/zoo_build.py
    assert set(manifest["models"]) == set(MODEL_DIRS)
    assert manifest["models"]["base"] == {**manifest["models"]["base"], "role": "base", "task": None}
    for name, entry in manifest["models"].items():
        assert (mini_zoo / name / "model.safetensors").is_file()
        assert set(entry["test_exact_match"]) == set(EXPERT_TASKS)
        assert all(0.0 <= v <= 1.0 for v in entry["test_exact_match"].values())
        if name != "base":
            assert entry["role"] == "expert" and entry["task"] in EXPERT_TASKS


def test_models_reload_offline_in_fresh_process(mini_zoo: Path, tmp_path: Path) -> None:
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "for d in sys.argv[1:]:\n"
        "    tok = AutoTokenizer.from_pretrained(d)\n"
        "    m = AutoModelForCausalLM.from_pretrained(d)\n"
        "    ids = tok('R:abcdef=', return_tensors='pt')['input_ids']\n"
        "    assert tok.decode(ids[0]) == 'R:abcdef=', tok.decode(ids[0])\n"
        "    assert m(input_ids=ids).logits.shape[-1] == m.config.vocab_size\n"
        "    print(type(m).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", code, *(str(mini_zoo / d) for d in MODEL_DIRS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LlamaForCausalLM"] * len(MODEL_DIRS)


def test_lm_eval_matches_zoo_greedy_per_item(mini_zoo: Path) -> None:
    """lm-eval's generate_until exact match equals the zoo's own greedy decode, item by item."""
    from evomerge.evaluation.lm_tasks import load_tasks, make_lm, score_tasks
    from evomerge.model_loading import load_model_and_tokenizer
    from evomerge.zoo import greedy_hits

    model, tokenizer = load_model_and_tokenizer(mini_zoo / "add")
    lm = make_lm(model, tokenizer, batch_size=64)
    loaded = load_tasks(EXPERT_TASKS, split="test")
    n = 200
    results = score_tasks(lm, loaded, samples={t: list(range(n)) for t in EXPERT_TASKS}, log_samples=True)
    informative = 0
    for task in EXPERT_TASKS:
        ours = greedy_hits(model, read_split(tasks_dir(), task, "test")[:n])
        theirs = [bool(s["exact_match"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
        assert theirs == ours, task
        informative += 0 < sum(ours) < n
    assert informative >= 1, "need at least one task with mixed hits for the comparison to mean something"


def test_same_seed_same_bytes(mini_zoo: Path, tmp_path: Path) -> None:
    from evomerge.zoo import build_zoo

    again = build_zoo(tmp_path / "again", seed=0, mini=True, quiet=True)
    for name in MODEL_DIRS:
        assert (tmp_path / "again" / name / "model.safetensors").read_bytes() == (
            mini_zoo / name / "model.safetensors"
        ).read_bytes(), name
    first = json.loads((mini_zoo / "manifest.json").read_text())
    assert again["models"] == first["models"]


def test_different_seed_different_weights(mini_zoo: Path, tmp_path: Path) -> None:
    from evomerge.zoo import build_zoo

    build_zoo(tmp_path / "other", seed=1, mini=True, quiet=True)
    assert (tmp_path / "other" / "base" / "model.safetensors").read_bytes() != (
        mini_zoo / "base" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("breakage", ["missing", "no_config", "bad_config", "no_weights"])
def test_eval_rejects_bad_model_dir_in_one_line(mini_zoo: Path, tmp_path: Path, breakage: str) -> None:
    target = tmp_path / "model"
    if breakage != "missing":
        target.mkdir()
        if breakage in ("bad_config", "no_weights"):
            (target / "config.json").write_text("{not json" if breakage == "bad_config" else "{}")
    out = run_cli("eval", str(target), "--tasks", "toy_add", "--limit", "5")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], out.stderr


def test_eval_cli_json_and_split(mini_zoo: Path) -> None:
    test = run_cli("eval", str(mini_zoo / "shift"), "--tasks", "toy_shift", "--json")
    val = run_cli("eval", str(mini_zoo / "shift"), "--tasks", "toy_shift", "--split", "validation", "--json")
    assert test.returncode == 0 and val.returncode == 0, test.stderr + val.stderr
    test_em = json.loads(test.stdout)["metrics"]["toy_shift"]["exact_match"]
    val_em = json.loads(val.stdout)["metrics"]["toy_shift"]["exact_match"]
    from evomerge.model_loading import load_model_and_tokenizer
    from evomerge.zoo import greedy_hits

    model, _ = load_model_and_tokenizer(mini_zoo / "shift")
    for split, em in (("test", test_em), ("validation", val_em)):
        hits = greedy_hits(model, read_split(tasks_dir(), "toy_shift", split))
        assert em == pytest.approx(sum(hits) / len(hits)), split


def test_zoo_build_refuses_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    out = run_cli("zoo", "build", str(foreign), "--mini")
    assert out.returncode != 0 and str(foreign) in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "no temporary directory left behind"


def test_committed_task_data_is_reproducible_and_disjoint() -> None:
    for name in EXPERT_TASKS:
        splits = make_splits(TASKS[name])
        prompts = {}
        for split, rows in splits.items():
            assert read_split(tasks_dir(), name, split) == rows, f"{name}/{split} differs from the generator"
            assert len(rows) == SPLIT_SIZES[split]
            prompts[split] = {r["prompt"] for r in rows}
        assert not prompts["train"] & prompts["validation"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["validation"] & prompts["test"]


def test_training_stream_never_yields_held_out_prompts() -> None:
    from evomerge.toy_tasks import held_out_prompts
    from evomerge.zoo import ExampleStream

    held = held_out_prompts(tasks_dir())
    stream = ExampleStream({"toy_add": 1.0}, "probe", held)
    drawn = {stream.sample()[0] for _ in range(20000)}
    assert not drawn & held
    assert len(drawn) > 5000  # it really explores the space (10,000 prompts, 1,000 held out)


@pytest.mark.slow
def test_full_zoo_meets_its_targets(tmp_path: Path) -> None:
    """The full zoo (the demo's sources) meets every acceptance target, measured on this machine."""
    from evomerge.zoo import build_zoo

    manifest = build_zoo(tmp_path / "zoo", seed=0, quiet=True)
    quality = {k: v for k, v in manifest["targets"].items() if k != "build_seconds_within_budget"}
    assert all(quality.values()), quality  # the time budget is measured by benchmarks/zoo_build.py
