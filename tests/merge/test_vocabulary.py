"""Vocabulary merging (`tokenizer:` / `tokenizer_source`): the same tensors and output vocabulary as
mergekit 0.1.5 on tiny Llamas with locally trained BPE tokenizers (one fine-tune with 8 added
tokens and resized embeddings), the row rules that hold by construction, the in-memory candidate
equal to the file merge, and bad input as one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.merge.runner import merge_from_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOLERANCE = 1e-5
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def ours(tmp_path: Path, recipe: dict, name: str = "evomerge") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    merge_from_file(path, out, progress=False)
    return out


def theirs(tmp_path: Path, recipe: dict) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path / "mergekit"
    options = MergeOptions(write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(json.loads(json.dumps(recipe))), str(out), options)
    return out


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def vocabulary(directory: Path) -> tuple[dict[str, int], dict[int, tuple[str, bool]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    added = {i: (t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items()}
    return tokenizer.get_vocab(), added


def rows(directory: Path, name: str = EMBED) -> tuple[torch.Tensor, dict[str, int]]:
    return weights(directory)[name], vocabulary(directory)[0]


def ties(zoo: dict[str, Path], *names: str, **extra) -> dict:
    params = [{"weight": 0.6, "density": 0.7}, {"weight": 0.5, "density": 0.5}, {"weight": 0.4, "density": 0.9}]
    return {
        "merge_method": "ties",
        "base_model": str(zoo["base"]),
        "dtype": "float32",
        "models": [{"model": str(zoo[n]), "parameters": p} for n, p in zip(names, params, strict=False)],
        **extra,
    }


def stack(zoo: dict[str, Path]) -> dict:
    """A layer stack: embeddings from ft1 alone (the 8 tokens it lacks get zero rows, as no model of
    that tensor has them), lm_head from ft_added alone."""
    return {
        "merge_method": "passthrough",
        "tokenizer": {"source": "union"},
        "slices": [
            {"sources": [{"model": str(zoo["ft1"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(zoo["ft_added"]), "layer_range": [1, 2]}]},
        ],
    }


# -- parity with mergekit 0.1.5 ------------------------------------------------------------------------------


def parity_cases(zoo: dict[str, Path]) -> dict[str, dict]:
    """Recipes whose output mergekit builds deterministically: at most one model brings tokens the
    base lacks, or all that do bring the same ones (mergekit orders the others' tokenizers by a
    set of model references, i.e. by PYTHONHASHSEED; evomerge uses the recipe's order)."""
    task_arithmetic = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "dtype": "float32",
        "models": [
            {"model": str(zoo["ft_added"]), "parameters": {"weight": 0.6}},
            {"model": str(zoo["ft_added2"]), "parameters": {"weight": 0.5}},
            {"model": str(zoo["ft1"]), "parameters": {"weight": 0.5}},
        ],
    }
    tokens = {
        "<extra_1>": {"source": str(zoo["ft_added"]), "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(zoo["ft1"]), "token": "the"}},
        "the": {"source": {"kind": "zero"}, "force": True},
        "<extra_3>": {"source": {"kind": "model_token", "model": str(zoo["ft_added2"]), "token_id": 5}, "force": True},
    }
    return {
        "union": ties(zoo, "ft1", "ft_added", tokenizer={"source": "union"}),
        "tokenizer_source_union": ties(zoo, "ft_added", "ft1", tokenizer_source="union"),
        "base": ties(zoo, "ft1", "ft_added", tokenizer={"source": "base"}),
        "model": ties(zoo, "ft1", "ft_added", tokenizer_source=str(zoo["ft_added"])),
        "tokens_and_padding": {
            **task_arithmetic,
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": tokens},
        },
        "mean_without_base": {
            "merge_method": "linear",
            "dtype": "float32",
            "tokenizer": {"source": "union"},
            "models": [
                {"model": str(zoo[n]), "parameters": {"weight": w}}
                for n, w in (("ft1", 0.3), ("ft_added", 0.7), ("ft_added2", 0.5))
            ],
        },
        "passthrough_stack": stack(zoo),
        "padded_rows_dropped": ties(zoo, "ft1", "ft_padded", tokenizer={"source": "base"}),
        "base_tokens_without_rows_stripped": {
            **ties(zoo, "ft1", "ft_added", tokenizer={"source": "union"}),
            "base_model": str(zoo["ft_unresized"]),
        },
        "tied_slerp_slices": {
            "merge_method": "slerp",
            "base_model": str(zoo["tied_base"]),
            "dtype": "float32",
            "parameters": {"t": [0.2, 0.7]},
            "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
            "slices": [
                {
                    "sources": [
                        {"model": str(zoo["tied_base"]), "layer_range": [0, 2]},
                        {"model": str(zoo["tied_added"]), "layer_range": [0, 2]},
                    ]
                }
            ],
        },
    }


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "case",
    [
        "passthrough_stack",
        "padded_rows_dropped",
        "base_tokens_without_rows_stripped",
        "union",
        "tokenizer_source_union",
        "base",
        "model",
        "tokens_and_padding",
        "mean_without_base",
        "tied_slerp_slices",
    ],
)
def test_matches_mergekit(tmp_path, vocab_zoo, case):
    pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e .[test])")
    recipe = parity_cases(vocab_zoo)[case]
    mine, reference = ours(tmp_path, recipe), theirs(tmp_path, recipe)
    a, b = weights(mine), weights(reference)
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        worst = max(worst, (a[name].double() - b[name].double()).abs().max().item())
    print(f"{case}: max |evomerge - mergekit| = {worst:.3g}")
    assert worst <= TOLERANCE
    assert vocabulary(mine) == vocabulary(reference)  # token -> id, and each added token's id and flag
    config, config_reference = (json.loads((d / "config.json").read_text()) for d in (mine, reference))
    assert config["vocab_size"] == config_reference["vocab_size"] == a[EMBED].shape[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mine)
    assert model.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    if case.startswith("tied"):
        assert HEAD not in a and model.get_output_embeddings().weight is model.get_input_embeddings().weight


# -- the rules, by construction -------------------------------------------------------------------------------


def test_union_rows_come_from_the_model_that_has_the_token(tmp_path, vocab_zoo):
    """ft_added alone has <extra_i>: every model's row for it is ft_added's, so its task vector is zero
    everywhere and the merged row is exactly ft_added's; rows the models share merge as usual."""
    out = ours(tmp_path, ties(vocab_zoo, "ft1", "ft_added", tokenizer={"source": "union"}))
    for name in (EMBED, HEAD):
        merged, vocab = rows(out, name)
        source, source_vocab = rows(vocab_zoo["ft_added"], name)
        base, base_vocab = rows(vocab_zoo["base"], name)
        assert merged.shape[0] == len(base_vocab) + 8 == len(vocab)
        for token in (f"<extra_{i}>" for i in range(8)):
            assert torch.equal(merged[vocab[token]], source[source_vocab[token]]), token
        changed = [t for t in base_vocab if not torch.equal(merged[vocab[t]], base[base_vocab[t]])]
        assert len(changed) > len(base_vocab) // 2  # shared tokens were merged, not copied


def test_union_order_follows_the_recipe(tmp_path, vocab_zoo):
    """Two models adding different tokens: ids and the settings of a token both add follow the
    recipe's model order (mergekit's depends on hashing), and each model keeps its own rows."""
    first = ours(tmp_path, ties(vocab_zoo, "ft_added", "ft_other", tokenizer={"source": "union"}), "a")
    second = ours(tmp_path, ties(vocab_zoo, "ft_other", "ft_added", tokenizer={"source": "union"}), "b")
    (vocab_a, added_a), (vocab_b, added_b) = vocabulary(first), vocabulary(second)
    assert set(vocab_a) == set(vocab_b) and len(vocab_a) == 120 + 9
    assert vocab_a["<extra_3>"] == 123 and vocab_a["<tool>"] == 128 and not added_a[123][1]  # ft_added's first
    assert vocab_b["<extra_3>"] == 120 and vocab_b["<tool>"] == 121 and added_b[120][1]  # ft_other's first
    merged_a, merged_b = weights(first)[EMBED], weights(second)[EMBED]
    assert torch.allclose(merged_a[vocab_a["<tool>"]], merged_b[vocab_b["<tool>"]], atol=1e-6)


def test_padding_rows_are_the_mean_of_the_real_rows(tmp_path, vocab_zoo):
    """Linear merging commutes with the row mean, so the padded rows of a linear merge equal the mean
    of its real rows; config and tokenizer describe the padded size and the real vocabulary."""
    recipe = {
        "merge_method": "linear",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 48},
        "models": [{"model": str(vocab_zoo[n]), "parameters": {"weight": w}} for n, w in (("ft1", 1), ("ft_added", 2))],
    }
    out = ours(tmp_path, recipe)
    merged, vocab = rows(out)
    assert merged.shape[0] == 144 and len(vocab) == 128
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 144
    torch.testing.assert_close(merged[128:], merged[:128].mean(0).expand(16, -1), atol=1e-6, rtol=0)


def test_same_vocabularies_merge_exactly_as_without_a_tokenizer_setting(tmp_path, vocab_zoo):
    plain = ours(tmp_path, ties(vocab_zoo, "ft1"), "plain")
    based = ours(tmp_path, ties(vocab_zoo, "ft1", tokenizer_source="base"), "based")
    a, b = weights(plain), weights(based)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert vocabulary(based) == vocabulary(vocab_zoo["base"])


@pytest.mark.parametrize("kernels", ["auto", "eager", "compiled"])  # flat pass, tensor by tensor, fused kernels
def test_the_in_memory_candidate_equals_the_file_merge(tmp_path, vocab_zoo, kernels):
    from evomerge.candidates.materialize import Materializer

    materializer = Materializer([vocab_zoo[n] for n in ("base", "ft1", "ft_added")], kernels=kernels)
    recipe = ties(vocab_zoo, "ft1", "ft_added", tokenizer={"source": "union", "pad_to_multiple_of": 48})
    for weight in (0.6, 0.3):  # the second candidate reuses the aligned rows and their task vectors
        recipe["models"][0]["parameters"]["weight"] = weight
        written = weights(ours(tmp_path, recipe, f"w{weight}"))
        built = materializer.apply(recipe)
        state = built.model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in written.items()), weight
    assert vocabulary(built.tokenizer_path) == vocabulary(tmp_path / "w0.3")
    assert len(materializer.aligned._store) == 2  # embeddings and lm_head, aligned once
    assert (materializer.flat.candidates > 0) == (kernels == "auto")
    assert (materializer.fused.fused_jobs > 0) == (kernels == "compiled" and not materializer.fused.disabled)
    stacked = materializer.apply(stack(vocab_zoo))
    assert stacked.mode == "in_place"  # re-indexed rows are written, not borrowed from a resident module
    written = weights(ours(tmp_path, stack(vocab_zoo), "stack"))
    state = stacked.model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in written.items())
    assert not written[EMBED][120:].any() and written[HEAD][120:].any()


# -- bad input ---------------------------------------------------------------------------------------------------


def bad_cases(zoo: dict[str, Path]) -> list[tuple[dict, str]]:
    def tokens(setting: dict) -> dict:
        return ties(zoo, "ft1", "ft_added", tokenizer={"source": "union", "tokens": {"<extra_0>": setting}})

    return [
        (ties(zoo, "ft1", "ft_added"), r"^model\.embed_tokens\.weight: .* vocabulary sizes differ; add `tokenizer: "),
        (tokens({"source": "/nonexistent/model"}), r"^tokenizer\.tokens\.<extra_0>\.source: model '/nonexistent/"),
        (
            tokens({"source": str(zoo["ft_other"])}),
            r"^tokenizer\.tokens\.<extra_0>\.source: .* is not one of the recipe",
        ),
        (tokens({"source": str(zoo["ft1"])}), r"^tokenizer\.tokens\.<extra_0>\.source: .* has no token '<extra_0>'"),
        (tokens({"force": True}), r"^tokenizer\.tokens\.<extra_0>\.source: required, because"),
        (
            tokens({"source": {"kind": "model_token", "model": str(zoo["ft1"]), "token": "<nope>"}}),
            r"^tokenizer\.tokens\.<extra_0>\.source\.token: .* has no token '<nope>'",
        ),
        (
            tokens({"source": {"kind": "model_token", "model": str(zoo["ft1"]), "token_id": 999}}),
            r"^tokenizer\.tokens\.<extra_0>\.source\.token_id: 999 is out of range",
        ),
        (
            ties(zoo, "ft1", "ft_added", tokenizer={"source": "/nonexistent/model"}),
            r"^tokenizer\.source: model '/nonexistent/model' not found",
        ),
        (
            tokens({"source": {"kind": "model_token", "model": str(zoo["ft1"])}}),
            r"^tokenizer\.tokens\.<extra_0>\.source: give exactly one of token or token_id",
        ),
    ]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, vocab_zoo, monkeypatch):
    from evomerge.io import checkpoint

    def forbidden(self, name):
        raise AssertionError("tensor data read before the recipe was validated")

    monkeypatch.setattr(checkpoint.CheckpointReader, "get", forbidden)
    for i, (recipe, pattern) in enumerate(bad_cases(vocab_zoo)):
        with pytest.raises(EvomergeError) as error:
            ours(tmp_path, recipe, f"bad{i}")
        message = str(error.value)
        assert "\n" not in message and __import__("re").search(pattern, message), (pattern, message)
        assert not (tmp_path / f"bad{i}").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_cli_bad_token_source_exits_2_with_one_line(tmp_path, vocab_zoo):
    from typer.testing import CliRunner

    from evomerge.cli.app import app

    recipe = ties(vocab_zoo, "ft1", "ft_added", tokenizer={"tokens": {"<x>": {"source": "/nonexistent/model"}}})
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: tokenizer.tokens.<x>.source: model '/nonexistent/model' not found")
    assert not (tmp_path / "out").exists()


def test_dry_run_describes_the_vocabulary(tmp_path, vocab_zoo):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(ties(vocab_zoo, "ft1", "ft_added", tokenizer={"pad_to_multiple_of": 48})))
    lines: list[str] = []
    merge_from_file(path, tmp_path / "out", dry_run=True, echo=lines.append)
    assert "vocabulary: 128 tokens, 144 rows; 2 tensor(s) re-indexed by token" in lines, lines
    assert not (tmp_path / "out").exists()


def test_union_of_different_bpe_vocabularies(tmp_path, vocab_zoo):
    """Plain tokens the base lacks follow it in the other model's id order; shared tokens (the
    specials, single letters) are aligned by string whatever their ids, and the other model's rows
    for its own tokens survive a linear merge (every model gets the same row for them)."""
    recipe = {
        "merge_method": "linear",
        "base_model": str(vocab_zoo["base"]),
        "tokenizer": {"source": "union"},
        "models": [{"model": str(vocab_zoo[n]), "parameters": {"weight": w}} for n, w in (("base", 1), ("foreign", 3))],
    }
    out = ours(tmp_path, recipe)
    merged, vocab = rows(out)
    base, base_vocab = rows(vocab_zoo["base"])
    other, other_vocab = rows(vocab_zoo["foreign"])
    new = sorted((t for t in other_vocab if t not in base_vocab), key=other_vocab.__getitem__)
    assert (
        new
        and [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        == [t for t, _ in sorted(base_vocab.items(), key=lambda kv: kv[1])] + new
    )
    for token in new:
        torch.testing.assert_close(merged[vocab[token]], other[other_vocab[token]], atol=1e-6, rtol=0)
    shared = [t for t in other_vocab if t in base_vocab and other_vocab[t] != base_vocab[t]]
    assert shared  # ids differ, strings match: rows are averaged by string, not by id
    for token in shared:
        expected = (base[base_vocab[token]] + 3 * other[other_vocab[token]]) / 4
        torch.testing.assert_close(merged[vocab[token]], expected, atol=1e-6, rtol=1e-5)


def test_data_aware_methods_refuse_re_indexed_vocabularies(tmp_path, vocab_zoo):
    """Calibration feeds the same token ids to every source, which differ in meaning here."""
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in ("the quick brown fox",) * 4))
    recipe = {
        "merge_method": "regmean",
        "tokenizer": {"source": "union"},
        "models": [{"model": str(vocab_zoo[n])} for n in ("ft1", "ft_added")],
        "calibration": {"file": str(data), "examples": 4, "seq_len": 8},
    }
    with pytest.raises(EvomergeError, match=r"^tokenizer: data-aware methods feed the same token ids"):
        ours(tmp_path, recipe)
    assert not (tmp_path / "evomerge").exists()
