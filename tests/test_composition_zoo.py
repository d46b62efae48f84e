"""The composition zoo (zoo/composition): the shipped models verify, no source solves the target,
and each expert is strong on its own task. (Whether a merge composes them is what
benchmarks/composition.py measures; at this scale none does, docs/zoo.md.)

Relations on the shipped weights (inference only, so any machine agrees), never a value one
machine's training reached; `-m slow` rebuilds the zoo and checks its manifest targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.io.paths import REPO_ROOT, tasks_dir
from evomerge.workers.candidate import Candidate
from evomerge.workers.fitness import FitnessWorker
from evomerge.zoo.composition import TARGET, TARGET_BAR, write_task_files
from evomerge.zoo.models import verify_zoo

torch.set_num_threads(1)

ZOO = REPO_ROOT / "zoo" / "composition"
LIMIT = 200
TASKS = ["comp_math_l2", "comp_math_l1", "comp_lang_l2"]


@pytest.fixture(scope="module")
def worker() -> FitnessWorker:
    verify_zoo(ZOO, seed=0)
    tasks = [{"name": t, "metric": "exact_match", "weight": 1.0, "limit": LIMIT} for t in TASKS]
    return FitnessWorker(sources=[str(ZOO / n) for n in ("base", "lang", "math")], tasks=tasks, split="test")


def scores(worker: FitnessWorker, recipe: dict) -> dict[str, float]:
    tasks = [{"name": t, "metric": "exact_match", "weight": 1.0, "limit": LIMIT} for t in TASKS]
    payload = {"recipe": recipe, "seed": None, "tasks": tasks, "split": "test", "subset_seed": 0}
    result = worker.evaluate(Candidate("c", payload))
    assert result.ok, result.reason
    return {t: result.metrics[f"{t}/exact_match"] for t in TASKS}


def source(name: str) -> dict:
    return {"merge_method": "passthrough", "models": [{"model": str(ZOO / name)}]}


def test_task_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    for path in write_task_files(tmp_path):
        assert path.read_bytes() == (tasks_dir() / path.relative_to(tmp_path)).read_bytes(), path.name


def test_training_never_sees_a_held_out_prompt_in_either_script() -> None:
    """The math expert trains on L1 arithmetic: an L2 test prompt spelled in L1 is held out too."""
    from evomerge.zoo.composition import SEQ_LEN, TASKS, TO_L1, all_splits, encode, held_out
    from evomerge.zoo.models import ExampleStream

    splits = all_splits()
    held = held_out(splits)
    target_test = {r["prompt"].translate(TO_L1) for r in splits[TARGET]["test"]}
    assert target_test <= held
    stream = ExampleStream({"comp_math_l1": 1.0, "comp_math_l2": 1.0}, "probe", held, TASKS, encode, SEQ_LEN)
    drawn = {stream.sample()[0] for _ in range(20000)}
    assert not drawn & held and len(drawn) > 5000


def test_no_source_solves_the_target_and_each_expert_is_strong_on_its_own_task(worker) -> None:
    base, lang, math_ = (scores(worker, source(n)) for n in ("base", "lang", "math"))
    assert max(base[TARGET], lang[TARGET], math_[TARGET]) < TARGET_BAR
    assert lang["comp_lang_l2"] >= base["comp_lang_l2"] + 0.3
    assert math_["comp_math_l1"] >= base["comp_math_l1"] + 0.3


@pytest.mark.slow
def test_a_rebuilt_composition_zoo_meets_its_targets(tmp_path: Path) -> None:
    from evomerge.zoo.composition import build_composition_zoo

    manifest = build_composition_zoo(tmp_path / "composition", quiet=True)
    assert all(manifest["targets"].values()), manifest["targets"]


def test_zoo_build_kind_is_checked(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evomerge.cli.app import app

    for args, message in (
        (["--kind", "bogus"], "--kind: 'bogus' is not one of toy, composition"),
        (["--kind", "composition", "--mini"], "--mini: the composition zoo has no mini flavour"),
    ):
        result = CliRunner().invoke(app, ["zoo", "build", str(tmp_path / "z"), *args])
        assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize(
    ("tied", "parts", "changed"),
    [
        (False, ("head", 7), {"lm_head.weight", "model.layers.7."}),
        (False, ("l2_rows",), {"model.embed_tokens.weight", "lm_head.weight"}),
        (True, ("l2_rows",), {"model.embed_tokens.weight", "lm_head.weight"}),  # one tied tensor
        (False, (2, 3), {"model.layers.2.", "model.layers.3."}),
    ],
)
def test_an_expert_of_a_design_variant_changes_only_its_parts(tied: bool, parts: tuple, changed: set[str]) -> None:
    """benchmarks/composition_variants.py's designs fine-tune named parts; everything else must stay
    the base's bytes, and row-masked matrices change only in the L2 rows."""
    from dataclasses import replace

    from evomerge.zoo.composition import L2_IDS, CompConfig, new_model, train_expert

    cfg = replace(CompConfig(hidden=16, layers=8, heads=2, tie_embeddings=tied), batch=4)
    cfg = replace(cfg, parts={"lang": parts, "math": None}, expert_steps={"lang": 3, "math": 3})
    base = {k: v.clone() for k, v in new_model(cfg, 0).state_dict().items()}
    tuned = train_expert(cfg, 0, set(), base, "lang")
    moved = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert moved and all(any(k.startswith(c) for c in changed) for k in moved), moved
    assert all(any(k.startswith(c) for k in moved) for c in changed), moved
    if "l2_rows" in parts:
        rows = torch.ones(base["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
        rows[L2_IDS] = False
        for key in moved:
            assert torch.equal(base[key][rows], tuned[key][rows]) and not torch.equal(base[key], tuned[key])
