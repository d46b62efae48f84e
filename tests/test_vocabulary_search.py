"""A search over sources whose vocabularies differ (one fine-tune added 8 tokens): the space's
`tokenizer:` block reaches every candidate, candidates are scored with the merged tokenizer, and the
exported recipe carries the block, so `evomerge merge` and mergekit-yaml rebuild the candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.candidates.materialize import Materializer
from evomerge.cli.search import run_search
from evomerge.merge.recipe import dump_recipe, load_recipe
from evomerge.merge.runner import merge_from_file
from evomerge.search.space import SearchSpace, load_space_config
from evomerge.workers.candidate import Candidate
from evomerge.workers.fitness import FitnessWorker

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TASKS = Path(__file__).resolve().parents[1] / "tasks"


def write_space(path: Path, zoo: dict[str, Path], *, tokenizer: str = "tokenizer: {source: union}\n") -> Path:
    path.write_text(
        f"""\
models: [{zoo["ft1"]}, {zoo["ft_added"]}]
base_model: {zoo["base"]}
tasks: [{{name: toy_add, limit: 3}}]
include_paths: [{TASKS}]
budget: {{max_evals: 4, popsize: 4, select_top_k: 1}}
seed: 5
worker: {{kwargs: {{batch_size: 8, torch_threads: 1}}}}
ps: {{method: ties, granularity: 1}}
{tokenizer}"""
    )
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_a_space_without_a_tokenizer_block_names_the_fix(tmp_path, vocab_zoo):
    from evomerge.errors import EvomergeError

    path = write_space(tmp_path / "space.yaml", vocab_zoo, tokenizer="")
    with pytest.raises(EvomergeError, match=r"vocabulary sizes differ; add `tokenizer: \{source: union\}`"):
        SearchSpace(load_space_config(path), root=tmp_path)


def test_candidates_are_scored_with_the_merged_tokenizer(tmp_path, vocab_zoo):
    space = SearchSpace(load_space_config(write_space(tmp_path / "space.yaml", vocab_zoo)), root=tmp_path)
    recipe = space.decode(space.x0, seed=0)
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "union"
    worker = FitnessWorker(
        space.source_models, [{"name": "toy_add", "limit": 3}], [TASKS], batch_size=8, torch_threads=1
    )
    payload = {"recipe": yaml.safe_load(dump_recipe(recipe)), "seed": 0, "split": "train", "limit": 3}
    result = worker.evaluate(Candidate("c0", payload))
    assert result.status == "ok", result.reason
    (path,) = worker._tokenizers
    assert len(worker._tokenizers[path]) == 128 and "<extra_7>" in worker._tokenizers[path].get_vocab()
    assert worker.materializer.aligned.nbytes > 0  # the aligned rows stay resident for the next candidate


@pytest.mark.mergekit
def test_search_exports_a_recipe_that_mergekit_and_evomerge_merge_to_the_candidate(tmp_path, vocab_zoo):
    pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e .[test])")
    run_dir = tmp_path / "run"
    summary = run_search(
        write_space(tmp_path / "space.yaml", vocab_zoo),
        run_dir,
        workers=1,
        ray_address=None,
        max_evals=None,
        seed=None,
        echo=lambda *_: None,
    )
    records = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    scored = [r for r in records if "status" in r]
    assert len(scored) >= 4 and all(r["status"] == "ok" for r in scored), [r.get("reason") for r in scored]
    assert summary["evaluations"] >= 4
    final_text = (run_dir / "final.yaml").read_text()
    final = yaml.safe_load(final_text)
    assert final["tokenizer"] == {"source": "union"}

    merged = tmp_path / "evomerge"
    merge_from_file(run_dir / "final.yaml", merged, progress=False)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(final),
        str(tmp_path / "mergekit"),
        MergeOptions(write_model_card=False, quiet=True),
    )
    ours, theirs = weights(merged), weights(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys() and ours["model.embed_tokens.weight"].shape[0] == 128
    worst = max((ours[n].double() - theirs[n].double()).abs().max().item() for n in ours)
    print(f"search export: max |evomerge - mergekit| = {worst:.3g}")
    assert worst <= 1e-5

    materializer = Materializer([vocab_zoo[n] for n in ("base", "ft1", "ft_added")])  # owns the tokenizer dir
    candidate = materializer.apply(load_recipe(run_dir / "final.yaml"))
    state = candidate.model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in ours.items())
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(merged).get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(candidate.tokenizer_path).get_vocab()


def test_a_shared_target_model_is_scored_with_each_candidates_tokenizer(tmp_path, vocab_zoo):
    """Two vocabularies of one size share the in-place target model; each candidate still gets its own
    tokenizer (the worker's cached HFLM is per target and tokenizer)."""
    worker = FitnessWorker([vocab_zoo["base"], vocab_zoo["ft1"]], batch_size=8, torch_threads=1)
    targets = set()
    for token in ("<a>", "<b>"):
        recipe = {
            "merge_method": "task_arithmetic",
            "base_model": str(vocab_zoo["base"]),
            "tokenizer": {"tokens": {token: {"source": {"kind": "zero"}}}},
            "models": [{"model": str(vocab_zoo["ft1"]), "parameters": {"weight": 0.5}}],
        }
        built = worker.materializer.apply(recipe)
        targets.add(id(built.model))
        assert token in worker._lm(built).tokenizer.get_vocab()
    assert len(targets) == 1  # one target model (the same output config) for both
