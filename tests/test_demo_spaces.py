"""The shipped search spaces parse, and the demo path runs end to end on a real (mini) zoo:
search -> summary -> export -> merged model whose score is the reported one -> same model in mergekit."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.io.paths import search_spaces_dir
from evomerge.search.space import load_space_config

SPACES = sorted(search_spaces_dir().rglob("*.yaml"))
SPACES = [p for p in SPACES if p.parent.name != "tasks"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli.app", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TQDM_DISABLE": "1"},
        timeout=600,
    )


def test_every_shipped_space_parses() -> None:
    kinds = {p.stem: load_space_config(p).kind for p in SPACES}
    assert kinds["toy_ps"] == "ps" and kinds["toy_dfs"] == "dfs" and kinds["toy_ps_dfs"] == "ps+dfs"
    assert kinds["evollm_ps"] == "ps" and kinds["evollm_ps_dfs"] == "ps+dfs"


def test_toy_spaces_search_the_shipped_zoo() -> None:
    """Every toy space names the shipped zoo/toy (verified before its search) and takes its models
    from there, so the demo's numbers do not depend on the machine that runs it."""
    from evomerge.io.paths import shipped_zoo
    from evomerge.zoo.models import verify_zoo

    verify_zoo(shipped_zoo(), seed=0, mini=False)
    for path in SPACES:
        if path.stem.startswith("toy_"):
            config = load_space_config(path)
            assert config.zoo is not None, f"{path.name} must name the shipped zoo"
            assert (path.parent / config.zoo.path).resolve() == shipped_zoo()
            for model in [*config.models, config.base_model or config.models[0]]:
                assert (path.parent / model).resolve().parent == shipped_zoo(), (path.name, model)


@pytest.fixture(scope="module")
def demo_run(mini_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy_ps.yaml pointed at the session's mini zoo, searched for two generations."""
    work = tmp_path_factory.mktemp("demo")
    data = yaml.safe_load((search_spaces_dir() / "toy_ps.yaml").read_text())
    data.pop("zoo")
    data["models"] = [str(mini_zoo / "add"), str(mini_zoo / "rev")]
    data["base_model"] = str(mini_zoo / "base")
    data["tasks"] = [{**t, "limit": 30} for t in data["tasks"]]
    data["budget"] = {**data["budget"], "select_top_k": 2}
    (work / "space.yaml").write_text(yaml.safe_dump(data))
    two_generations = 2 * data["budget"]["popsize"]
    out = cli("search", str(work / "space.yaml"), "--run-dir", str(work / "run"), "--max-evals", str(two_generations))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test score" in out.stdout
    return work / "run"


def test_demo_summary_reports_final_beside_sources(demo_run: Path, mini_zoo: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["final"]["recipe"] == "final.yaml" and (demo_run / "final.yaml").is_file()
    test = summary["final"]["test"]
    low, high = test["ci95"]
    assert 0.0 <= low <= test["score"] <= high <= 1.0
    assert set(summary["sources"]) >= {str(mini_zoo / "add"), str(mini_zoo / "rev")}
    space = yaml.safe_load((demo_run / "space.yaml").read_text())
    assert summary["evaluations"] == 2 * space["budget"]["popsize"] and summary["failed"] == 0
    journal = [json.loads(line) for line in (demo_run / "journal.jsonl").read_text().splitlines()]
    assert {
        "eval_id",
        "generation",
        "genome",
        "recipe_sha",
        "seed",
        "metrics",
        "fitness",
        "status",
        "seconds",
        "worker",
    } <= set(journal[0])


def test_exported_model_scores_what_the_summary_reports(demo_run: Path, tmp_path: Path) -> None:
    out = cli("export", str(demo_run), "-o", str(tmp_path / "recipe.yaml"), "--merge", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr[-2000:]
    scored = cli("eval", str(tmp_path / "merged"), "--tasks", "toy_add,toy_rev", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    metrics = json.loads(scored.stdout)["metrics"]
    mean = (metrics["toy_add"]["exact_match"] + metrics["toy_rev"]["exact_match"]) / 2
    summary = json.loads((demo_run / "summary.json").read_text())
    assert mean == pytest.approx(summary["final"]["test"]["score"], abs=1e-9)


@pytest.mark.mergekit
@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed")
def test_exported_ps_recipe_runs_unchanged_in_mergekit(demo_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    assert cli("export", str(demo_run), "-o", str(recipe), "--merge", str(tmp_path / "ours")).returncode == 0
    mergekit_yaml = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    assert mergekit_yaml, "mergekit is importable but its mergekit-yaml script is missing"
    run = subprocess.run(
        [mergekit_yaml, str(recipe), str(tmp_path / "theirs")], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name in ours:
        assert (ours[name].float() - theirs[name].float()).abs().max().item() <= 1e-5, name
