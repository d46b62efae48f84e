"""`evomerge merge` takes the options users type for mergekit-yaml: honoured, mapped, or refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_cli_errors import GOOD, _assert_clean_failure, _run
from typer.testing import CliRunner

from evomerge.cli.app import app

DARE = GOOD.replace("merge_method: ties", "merge_method: dare_ties")


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_mergekit_spellings_give_the_same_merge_as_evomerge_options(tmp_path, llama_zoo):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, out_a = _run(tmp_path / "a", llama_zoo, DARE, "--seed", "7", "--max-shard-size", "20000")
    theirs, out_b = _run(
        tmp_path / "b", llama_zoo, DARE, "--random-seed", "7", "--out-shard-size", "20K", "--lazy-unpickle"
    )
    assert ours.exit_code == 0 and theirs.exit_code == 0, (ours.output, theirs.output)
    assert "note: --lazy-unpickle has no effect" in theirs.output
    assert sorted(p.name for p in out_a.iterdir()) == sorted(p.name for p in out_b.iterdir())
    assert len(list(out_a.glob("*.safetensors"))) > 1  # 20K bytes, mergekit's units: several shards
    a, b = tensors(out_a), tensors(out_b)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    shutil.rmtree(tmp_path / "b")
    (tmp_path / "b").mkdir()
    other, _ = _run(tmp_path / "b", llama_zoo, DARE, "--random-seed", "8")
    assert other.exit_code == 0
    assert any(not torch.equal(a[n], t) for n, t in tensors(tmp_path / "b" / "out").items())  # the seed is used


def test_allow_crimes_is_accepted_with_a_note(tmp_path, llama_zoo):
    result, out = _run(tmp_path, llama_zoo, GOOD, "--allow-crimes")
    assert result.exit_code == 0 and "note: --allow-crimes has no effect" in result.output
    assert (out / "model.safetensors").exists()


def test_refused_and_conflicting_options_are_one_line(tmp_path, llama_zoo):
    for extra, fragment in [
        (["--trust-remote-code"], "--trust-remote-code: evomerge never runs code"),
        (["--out-shard-size", "5GB"], "--out-shard-size: cannot parse '5GB'"),
        (["--random-seed", "1", "--seed", "2"], "--random-seed: conflicts with --seed"),
        (["--cuda", "--device", "mps"], "--cuda: conflicts with --device mps"),
    ]:
        result, out = _run(tmp_path, llama_zoo, GOOD, *extra)
        _assert_clean_failure(result, out, fragment)
    if not torch.cuda.is_available():
        result, out = _run(tmp_path, llama_zoo, GOOD, "--cuda")
        _assert_clean_failure(result, out, "cuda requested but no CUDA device")


def test_a_pickle_checkpoint_is_refused_with_how_to_convert(tmp_path, llama_zoo):
    model = tmp_path / "pickled"
    shutil.copytree(llama_zoo["ft1"], model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1}}\n")
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    _assert_clean_failure(
        result, tmp_path / "out", "safetensors only", "save_pretrained(NEW_DIR, safe_serialization=True)"
    )


def test_no_copy_tokenizer_writes_weights_and_config_only(tmp_path, llama_zoo):
    result, out = _run(tmp_path, llama_zoo, GOOD, "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "tokenizer_config.json").exists()
    (tmp_path / "again").mkdir()
    result, out = _run(tmp_path / "again", llama_zoo, GOOD, "--copy-tokenizer")
    assert result.exit_code == 0 and (out / "tokenizer_config.json").exists()
