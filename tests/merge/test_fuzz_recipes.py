"""Fuzzed recipes: valid recipes edited at random (wrong types, NaN/inf and huge numbers, missing and
extra keys at every level, empty lists, unicode and odd paths, odd gradients, filter lists and layer
ranges, unknown methods, duplicate models, crafted model folders) are parsed, validated, planned
and, for some, merged; each ends in success or a one-line `EvomergeError`, never a traceback.

`@example`s pin the inputs that once ended in a traceback."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from fuzz_inputs import Schema, edited, one_line, yaml_text  # noqa: E402
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from evomerge.cli.app import app  # noqa: E402
from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.merge.jobs import ModelCatalog  # noqa: E402
from evomerge.merge.methods.registry import method_names  # noqa: E402
from evomerge.merge.plan import plan_merge  # noqa: E402
from evomerge.merge.recipe import loads_recipe  # noqa: E402
from evomerge.merge.runner import CheckpointSource, FileSink, run_plan  # noqa: E402
from evomerge.merge.validation import validate_recipe  # noqa: E402

BASES: list[dict[str, Any]] = [
    yaml.safe_load(text)
    for text in (
        # the GOOD recipe of test_cli_errors.py
        """
merge_method: ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft2, parameters: {weight: 0.5, density: 0.7}}
""",
        """
merge_method: linear
slices:
  - sources:
      - {model: ft1, layer_range: [0, 2], parameters: {weight: [0.2, 0.8]}}
      - {model: ft2, layer_range: [0, 2], parameters: {weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]}}
  - sources:
      - {model: ft1, layer_range: [2, 4], parameters: {weight: 1.0}}
      - {model: ft3, layer_range: [1, 3], parameters: {weight: 0.5}}
parameters: {normalize: true}
dtype: float32
""",
        """
merge_method: passthrough
slices:
  - sources: [{model: deep, layer_range: [0, 3]}]
  - sources:
      - model: ft1
        layer_range: [1, 4]
        parameters: {scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: 0.5}, {value: 1}]}
""",
        """
merge_method: dare_ties
base_model: base
models:
  - {model: ft1, parameters: {weight: [0.1, 0.9], density: [0.9, 0.3, 0.6]}}
  - {model: ft3, parameters: {weight: 0.4, density: 0.5}}
parameters: {lambda: 1.1, rescale: true, consensus: count}
seed: 7
out_dtype: bfloat16
tokenizer_source: base
""",
        """
merge_method: nuslerp
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.3}}
  - {model: ft2, parameters: {weight: 0.7}}
parameters: {nuslerp_row_wise: true}
""",
        """
merge_method: slerp
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 4]}
      - {model: ft2, layer_range: [0, 4]}
parameters: {t: [{filter: mlp, value: [0, 1]}, {value: 0.5}]}
""",
        """
merge_method: karcher
models: [{model: ft1}, {model: ft2}, {model: ft3}]
parameters: {max_iter: 4, tol: 1e-6}
""",
    )
]

MODELS = ["base", "ft1", "ft2", "ft3", "deep", "not_a_model", "no_weights", "bad_config", "list_config", "truncated"]
MODELS += ["x" * 300, "~evomerge-nouser/ft1", "ft1+nowhere", "ft1/config.json", ".", "/"]
KEYS = sorted(
    {
        "merge_method",
        "base_model",
        "models",
        "slices",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "tokenizer",
        "seed",
        "calibration",
        "modules",
        "model",
        "layer_range",
        "sources",
        "residual_weight",
        "filter",
        "value",
        "source",
        "tokens",
        "pad_to_multiple_of",
        "weight",
        "density",
        "t",
        "scale",
        "lambda",
        "normalize",
        "max_iter",
        "epsilon",
        "gamma",
        "select_topk",
    }
)
_NUMBER = st.sampled_from([0, 1, -1, 0.5, 2, 1e9, -0.0])
SCHEMA_VALUES = st.one_of(
    st.sampled_from(MODELS),
    st.sampled_from(method_names() + ["tie", "TIES", "mergekit"]),
    st.sampled_from(["float16", "bfloat16", "float32", "float8_e4m3fn", "int8", "auto", "union", "base"]),
    st.lists(st.integers(-3, 9), min_size=0, max_size=3),  # layer ranges, wrong-length ones too
    st.lists(_NUMBER, max_size=5),  # gradients, empty ones too
    st.lists(
        st.fixed_dictionaries(
            {"filter": st.sampled_from(["mlp", "self_attn", "*", "", "zz"])},
            optional={"value": _NUMBER | st.lists(_NUMBER, max_size=3)},
        ),
        max_size=3,
    ),  # fmt: skip
    st.fixed_dictionaries({"model": st.sampled_from(MODELS)}, optional={"parameters": st.just({"weight": 1})}),
    st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS), "layer_range": st.lists(st.integers(-1, 7), min_size=2, max_size=2)}
    ),  # fmt: skip
    st.fixed_dictionaries({"source": st.sampled_from(["union", "base", "ft1", "nowhere"])}),
    st.dictionaries(st.sampled_from(["weight", "density", "t", "lambda", "normalize", "scale"]), _NUMBER, max_size=2),
)
SCHEMA = Schema(KEYS, SCHEMA_VALUES)
RECIPES = edited(BASES, SCHEMA)


@pytest.fixture(scope="module")
def model_dirs(llama_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The folders relative model names resolve in: the llama zoo and crafted broken model folders."""
    odd = tmp_path_factory.mktemp("odd_models")
    (odd / "not_a_model").mkdir()  # no config.json
    shutil.copytree(llama_zoo["ft1"], odd / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(llama_zoo["ft1"], odd / "bad_config")
    (odd / "bad_config" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_hidden_lay')
    shutil.copytree(llama_zoo["ft1"], odd / "list_config")
    (odd / "list_config" / "config.json").write_text(json.dumps(["LlamaForCausalLM"]))
    shutil.copytree(llama_zoo["ft1"], odd / "truncated")
    weights = odd / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return [llama_zoo["base"].parent, odd]


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A folder for one example's outputs (hypothesis runs many examples per test call)."""
    path = Path(tempfile.mkdtemp(prefix="evomerge-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def check_recipe_text(text: str, model_dirs: list[Path], out: Path | None) -> str:
    """Parse, validate and plan `text` (and merge it into `out` when given): "ok", or the one-line
    error ("planned", "merged" or the message). Any other exception propagates: that is the bug the
    fuzzer looks for."""
    try:
        recipe = loads_recipe(text)
        method = validate_recipe(recipe)
        plan = plan_merge(recipe, ModelCatalog(model_dirs))
        if out is not None and "prepare" not in method.extra:  # data-aware methods need calibration data
            source = CheckpointSource(plan)
            try:
                run_plan(plan, FileSink(out / "merged", max_shard_bytes=200_000), source)
            finally:
                source.close()
            assert (out / "merged" / "config.json").is_file()
            shutil.rmtree(out / "merged")
            return "merged"
    except EvomergeError as error:
        return one_line(error)
    return "planned"


def _fuzz_recipes(model_dirs: list[Path], scratch: Path, text: str, merge: bool) -> None:
    work = Path(tempfile.mkdtemp(dir=scratch))
    outcome = check_recipe_text(text, model_dirs, work if merge else None)
    event(outcome if outcome in ("planned", "merged") else "one-line error")
    assert not (work / "merged").exists(), outcome  # a failed merge leaves nothing behind
    assert not [p for p in work.iterdir() if p.name.startswith(".merged.")], outcome


FUZZ = dict(
    database=None,  # derandomized: the same examples every run, nothing saved
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
MERGE_SOME = st.integers(0, 4).map(lambda n: n == 0)  # one example in five is merged for real when it plans


GOOD = yaml.safe_dump(BASES[0], sort_keys=False)
ALIAS_BOMB = "[" + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 10) + "]" for i in range(7)) + "]"


@settings(max_examples=80, **FUZZ)
@given(text=yaml_text(RECIPES), merge=MERGE_SOME)
@example(text=GOOD.replace("weight: 0.5", f"weight: {10**400}"), merge=False)  # was OverflowError in as_number
@example(text=GOOD.replace("model: ft2", "model: " + "x" * 300), merge=False)  # was OSError: File name too long
@example(text=GOOD.replace("model: ft2", "model: ~evomerge-nouser/ft2"), merge=False)  # was RuntimeError (home)
@example(text=GOOD.replace("weight: 0.5", f"weight: {ALIAS_BOMB}"), merge=False)  # was a 50 MB error line
def test_fuzzed_recipes_end_in_success_or_one_line(model_dirs, scratch, text, merge):
    _fuzz_recipes(model_dirs, scratch, text, merge)


@pytest.mark.slow
@settings(max_examples=1500, **FUZZ)
@given(text=yaml_text(edited(BASES, SCHEMA, max_edits=5)), merge=MERGE_SOME)
def test_fuzzed_recipes_many(model_dirs, scratch, text, merge):
    _fuzz_recipes(model_dirs, scratch, text, merge)


def _cli_merge(zoo: dict[str, Path], model_dirs: list[Path], scratch: Path, text: str | bytes) -> None:
    """`evomerge merge` on the fuzzed text from a folder where the model names resolve: exit 0 with a
    model written, or exit 2 with exactly one `error:` line and nothing written."""
    scratch = Path(tempfile.mkdtemp(dir=scratch))
    for folder in model_dirs:
        for model in folder.iterdir():
            if not (scratch / model.name).exists():
                (scratch / model.name).symlink_to(model)
    (scratch / "recipe.yml").write_bytes(text if isinstance(text, bytes) else text.encode())
    out = scratch / "out"
    result = CliRunner().invoke(app, ["merge", str(scratch / "recipe.yml"), str(out), "--quiet"])
    event(f"exit {result.exit_code}")
    if result.exit_code == 0:
        assert (out / "config.json").is_file(), result.output
        return
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists()
    assert not [p for p in scratch.iterdir() if p.name.startswith(".out.")]


@settings(max_examples=8, **FUZZ)
@given(text=yaml_text(RECIPES))
@example(text=GOOD.encode() + b"# \xff\xfe\n")  # was UnicodeDecodeError: the recipe file is not UTF-8
def test_fuzzed_recipes_through_the_cli(llama_zoo, model_dirs, scratch, text):
    _cli_merge(llama_zoo, model_dirs, scratch, text)


@pytest.mark.slow
@settings(max_examples=200, **FUZZ)
@given(text=yaml_text(edited(BASES, SCHEMA, max_edits=5)))
def test_fuzzed_recipes_through_the_cli_many(llama_zoo, model_dirs, scratch, text):
    _cli_merge(llama_zoo, model_dirs, scratch, text)


# -- crafted model folders: a config.json edited like the recipes ----------------------------------

CONFIG_KEYS = [
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "torch_dtype",
    "dtype",
    "layer_types",
    "max_window_layers",
    "n_layer",
]
CONFIG_VALUES = st.one_of(
    st.sampled_from(["LlamaForCausalLM", "GPT2LMHeadModel", "MistralForCausalLM", "NopeForCausalLM", "llama", "gpt2"]),
    st.lists(st.sampled_from(["LlamaForCausalLM", "GPT2LMHeadModel", "Nope", 3]), max_size=2),
    st.integers(-2, 6) | st.sampled_from([10**9, 2**63]),
    st.lists(st.sampled_from(["full_attention", "sliding_attention", 1]), max_size=6),
)
CONFIG_SCHEMA = Schema(CONFIG_KEYS, CONFIG_VALUES)
CONFIG_RECIPES = [
    "merge_method: ties\nbase_model: base\nmodels:\n"
    "  - {model: ft1, parameters: {weight: 1, density: 0.5}}\n  - {model: crafted, parameters: {weight: 1}}\n",
    "merge_method: passthrough\nslices:\n  - sources: [{model: crafted, layer_range: [0, 2]}]\n"
    "  - sources: [{model: ft1, layer_range: [2, 4]}]\n",
    "merge_method: linear\nbase_model: crafted\nmodels: [{model: ft1, parameters: {weight: 1}}]\n",
]


LLAMA_CONFIG = {  # what the planner and the output config read of tests/merge/conftest.py's llamas
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 4,
    "hidden_size": 32,
    "intermediate_size": 48,
    "vocab_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
CONFIGS = edited([LLAMA_CONFIG], CONFIG_SCHEMA)


@pytest.fixture(scope="module")
def crafted(llama_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `crafted`, a copy of ft2 whose config.json each example rewrites."""
    folder = tmp_path_factory.mktemp("crafted")
    shutil.copytree(llama_zoo["ft2"], folder / "crafted")
    return folder


def _fuzz_config(llama_zoo, crafted: Path, scratch: Path, config: Any, recipe: str, merge: bool) -> None:
    (crafted / "crafted" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    work = Path(tempfile.mkdtemp(dir=scratch))
    outcome = check_recipe_text(recipe, [llama_zoo["base"].parent, crafted], work if merge else None)
    event(outcome if outcome in ("planned", "merged") else "one-line error")
    assert not (work / "merged").exists()


@settings(max_examples=40, **FUZZ)
@given(config=CONFIGS, recipe=st.sampled_from(CONFIG_RECIPES), merge=MERGE_SOME)
@example(config=["LlamaForCausalLM"], recipe=CONFIG_RECIPES[0], merge=False)  # was AttributeError: 'list' ... 'get'
@example(config=None, recipe=CONFIG_RECIPES[0], merge=False)  # was AttributeError
@example(config={**LLAMA_CONFIG, "architectures": 3}, recipe=CONFIG_RECIPES[0], merge=False)  # was TypeError
@example(config={**LLAMA_CONFIG, "architectures": [["LlamaForCausalLM"]]}, recipe=CONFIG_RECIPES[1], merge=False)
@example(config={**LLAMA_CONFIG, "num_hidden_layers": 10**9}, recipe=CONFIG_RECIPES[2], merge=False)
@example(config={**LLAMA_CONFIG, "num_hidden_layers": True}, recipe=CONFIG_RECIPES[1], merge=True)
def test_fuzzed_model_configs_end_in_success_or_one_line(llama_zoo, crafted, scratch, config, recipe, merge):
    _fuzz_config(llama_zoo, crafted, scratch, config, recipe, merge)


@pytest.mark.slow
@settings(max_examples=500, **FUZZ)
@given(
    config=edited([LLAMA_CONFIG], CONFIG_SCHEMA, max_edits=5), recipe=st.sampled_from(CONFIG_RECIPES), merge=MERGE_SOME
)
def test_fuzzed_model_configs_many(llama_zoo, crafted, scratch, config, recipe, merge):
    _fuzz_config(llama_zoo, crafted, scratch, config, recipe, merge)
