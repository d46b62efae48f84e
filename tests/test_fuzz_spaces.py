"""Fuzzed search spaces: valid spaces (PS, DFS, PS+DFS, multi-objective, staged) edited at random
(wrong types, NaN/inf and huge numbers, missing and extra keys at every level, empty lists, unicode
and odd paths, reversed bounds, unknown methods, duplicate models) are parsed and bound to their
models, and random genomes (in bounds, out of bounds, NaN, of the wrong length) are decoded and
planned; each ends in success or a one-line `EvomergeError`, never a traceback. A few go through
`evomerge search` too: exit 2, one `error:` line and no run directory.

`@example`s pin the inputs that once ended in a traceback."""

from __future__ import annotations

import math
import random
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
from search_worker import make_models  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from evomerge.cli.app import app  # noqa: E402
from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.io.yaml_files import parse_yaml  # noqa: E402
from evomerge.search.space import SearchSpace, parse_space  # noqa: E402
from evomerge.search.space.config import PS_METHODS  # noqa: E402

BASES_TEXT = [
    # the SPACE of test_cli.py
    """
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add, weight: 0.5}, {name: toy_rev, weight: 0.5}]
budget: {max_evals: 12, popsize: 6, select_top_k: 2}
seed: 5
worker: {factory: "search_worker:ToyFitnessWorker"}
ps: {method: dare_ties, granularity: 2}
""",
    """
models: [models/a, models/b]
tasks: [{name: toy_add, metric: exact_match, limit: 20}]
budget: {max_evals: 8, sigma0: 0.3}
worker: {factory: "search_worker:ToyFitnessWorker", timeout: 30, penalty: -1}
dfs: {repeats: 2, scales: model_pair, max_path_length: 6, scale_bounds: [0.5, 1.5], anchor: models/b}
""",
    """
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add}, {name: toy_rev}]
splits: {search: train, select: validation, report: test}
ps: {method: ties, granularity: layer, split_attn_mlp: true, embedding_genes: true}
dfs: {repeats: 1, indicator_bounds: [-1, 2], indicator_on: 1.0}
""",
    """
models: [models/a, models/b]
base_model: models/base
tasks: [{name: toy_add, weight: 2}, {name: toy_rev, weight: -1}]
objectives: [{task: toy_add}, {measure: size, direction: minimize}]
optimizer: {name: optuna, sampler: nsga2, options: {population_size: 4}}
fidelity: {stages: [4, 16], z: 1.5, rank: 2}
ps:
  method: della
  genes: {weight: [-1, 2], density: [0.1, 1.0], epsilon: [0.0, 0.2]}
  x0: {weight: 0.5}
  parameters: {lambda: 1.2, rescale: true}
  mask_seed: candidate
  decimals: 3
""",
    """
name: linear layers
models: [models/a, models/b]
tasks: [{name: toy_add}]
optimizer: random
ps: {method: linear, granularity: 1, parameters: {normalize: true}, genes: {weight: [0.1, 1]}}
tokenizer: {source: union, pad_to_multiple_of: 8}
""",
]
BASES: list[dict[str, Any]] = [yaml.safe_load(text) for text in BASES_TEXT]

MODELS = ["models/a", "models/b", "models/base", "a", "models", "models/nope", "models/a/config.json", "/", "x" * 300]
KEYS = sorted(
    {
        *("name", "zoo", "models", "base_model", "tasks", "prompts", "include_paths", "splits", "budget"),
        *("seed", "optimizer", "objectives", "fidelity", "worker", "ps", "dfs", "tokenizer"),
        *("metric", "weight", "limit", "search", "select", "report", "max_evals", "popsize", "sigma0"),
        *("select_top_k", "sampler", "options", "task", "measure", "direction", "stages", "z", "rank"),
        *("factory", "kwargs", "penalty", "timeout", "method", "granularity", "split_attn_mlp"),
        *("embedding_genes", "genes", "x0", "parameters", "calibration", "mask_seed", "decimals"),
        *("repeats", "anchor", "anchor_layers", "max_path_length", "scales", "scale_bounds"),
        *("indicator_bounds", "indicator_on", "indicator_off", "path", "mini", "density", "epsilon"),
    }
)
_BOUND = st.sampled_from([0, 1, -1, 0.5, 2, 1e-9, 1e12, -0.0])
SCHEMA_VALUES = st.one_of(
    st.sampled_from(MODELS),
    st.lists(st.sampled_from(MODELS), max_size=3),  # model lists: empty, duplicates, odd paths
    st.sampled_from([*PS_METHODS, "slerp", "passthrough", "TIES", "whole", "layer", "train", "test"]),
    st.sampled_from(["cma", "random", "optuna", "optuna:tpe", "optuna:nsga2", "cma:tpe", "model_pair", "run"]),
    st.lists(_BOUND, max_size=3),  # bounds, stages: reversed, equal, wrong length
    st.dictionaries(
        st.sampled_from(["weight", "density", "epsilon", "gamma", "t", "lambda"]),
        st.lists(_BOUND, min_size=2, max_size=2),
        max_size=2,
    ),  # fmt: skip
    st.fixed_dictionaries(
        {"name": st.sampled_from(["toy_add", "toy_rev", "", "nope"])},
        optional={"weight": _BOUND, "limit": st.integers(-1, 3)},
    ),  # fmt: skip
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "task": st.sampled_from(["toy_add", "x"]),
                "measure": st.sampled_from(["size", "path_length", "speed"]),
            },
        ),
        max_size=3,
    ),  # fmt: skip
    st.integers(-2, 5),
)
SCHEMA = Schema(KEYS, SCHEMA_VALUES)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the spaces live in: their models under models/ (a base and two fine-tunes)."""
    root = tmp_path_factory.mktemp("fuzz_spaces")
    make_models(root / "models")
    return root


def _genomes(space: SearchSpace, rng: random.Random) -> list[list[float]]:
    """x0, a random genome in bounds, the same with one coordinate out of bounds (or NaN/inf), and
    one of the wrong length."""
    genes = space.genes
    inside = [rng.uniform(g.low, g.high) for g in genes]
    outside = list(inside)
    if genes:
        at = rng.randrange(len(genes))
        gene = genes[at]
        outside[at] = rng.choice([math.nan, math.inf, -math.inf, 1e300, gene.high + gene.span, gene.low - 1e-9])
    return [space.x0, inside, outside, inside[: rng.randrange(len(genes) + 1)] + [0.0] * 2]


def check_space_text(text: str | bytes, root: Path, seed: int) -> str:
    """Parse `text` as a search space, bind it (the PS stage of a PS+DFS space, as a search does
    before its run directory exists) and decode and plan a few genomes (drawn with `seed`): "ok", or
    the one-line error; any other exception propagates."""
    from evomerge.merge.plan import plan_merge
    from evomerge.search.entry import resolve_staged

    rng = random.Random(seed)
    try:
        config = parse_space(parse_yaml(text, "space.yaml"), source="space.yaml")
        if config.kind == "ps+dfs":
            config = resolve_staged(config, root).model_copy(update={"dfs": None})
        space = SearchSpace(config, root=root)
        event("bound")
        for genome in _genomes(space, rng):
            try:
                plan_merge(space.decode(genome, seed=rng.randrange(2**32)), space.catalog)
            except EvomergeError as error:
                one_line(error)
    except EvomergeError as error:
        event("one-line error")
        return one_line(error)
    return "ok"


FUZZ = dict(
    database=None,  # derandomized: the same examples every run, nothing saved
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
SPACES = edited(BASES, SCHEMA)
SEEDS = st.integers(0, 2**32)  # genomes and mask seeds


TOY = BASES_TEXT[0]
PS_BLOCK = "ps: {method: dare_ties, granularity: 2}"


@settings(max_examples=80, **FUZZ)
@given(text=yaml_text(SPACES), seed=SEEDS)
@example(text=TOY.replace(PS_BLOCK, "dfs: {repeats: 2147483648}"), seed=0)  # was a hang (2**31 layer slots)
@example(text=TOY + 'include_paths: ["\\0"]\n', seed=0)  # was ValueError: embedded null byte
@example(text=TOY + f"include_paths: [{'x' * 300}]\n", seed=0)  # was OSError: File name too long
@example(text=TOY.replace("[models/a, models/b]", f"[{'x' * 300}, models/b]"), seed=0)  # was OSError
@example(text=TOY.replace("[models/a, models/b]", "[~evomerge-nouser/a, models/b]"), seed=0)  # was RuntimeError
def test_fuzzed_spaces_end_in_success_or_one_line(root, text, seed):
    check_space_text(text, root, seed)


@pytest.mark.slow
@settings(max_examples=1500, **FUZZ)
@given(text=yaml_text(edited(BASES, SCHEMA, max_edits=5)), seed=SEEDS)
def test_fuzzed_spaces_many(root, text, seed):
    check_space_text(text, root, seed)


# -- through `evomerge search` ----------------------------------------------------------------------


@pytest.fixture()
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="evomerge-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cli_search(root: Path, scratch: Path, text: str | bytes, seed: int) -> None:
    """`evomerge search` on the fuzzed space (one generation: --max-evals 1). A space the library
    refuses is refused before the run directory exists: exit 2, exactly one `error:` line. Any other
    ends with exit 0, or exit 2 with an `error:` line and the `evomerge resume` line; never a traceback."""
    refused = check_space_text(text, root, seed) != "ok"
    work = Path(tempfile.mkdtemp(dir=scratch))
    (work / "models").symlink_to(root / "models")
    (work / "space.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    run = work / "run"
    result = CliRunner().invoke(app, ["search", str(work / "space.yaml"), "--run-dir", str(run), "--max-evals", "1"])
    event(f"exit {result.exit_code}")
    assert result.exit_code in (0, 2), (result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    if refused:
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert not run.exists()
    elif result.exit_code == 2:
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0] >= len(lines) - 2, result.output
        assert run.exists() or errors[0] == len(lines) - 1, result.output
        if errors[0] == len(lines) - 2:
            assert lines[-1].startswith("the run is saved; continue it with: evomerge resume"), result.output


@settings(max_examples=8, **FUZZ)
@given(text=yaml_text(SPACES), seed=SEEDS)
@example(text=TOY.replace("popsize: 6", "popsize: 1000000000000"), seed=0)  # was a hang in CMA-ES
@example(text=TOY.replace("popsize: 6", "popsize: 6, sigma0: 1.0e-320"), seed=0)  # was AssertionError in cma
@example(
    text=TOY.replace("granularity: 2", "granularity: 2, genes: {weight: [-1.0e+308, 1.0e+308]}"), seed=0
)  # was ValueError: NaN in JSON  # noqa: E501
@example(text=TOY.replace(PS_BLOCK, "dfs: {indicator_bounds: [-1.0e+308, 1.0e+308]}"), seed=0)  # ditto
@example(text=TOY.replace(PS_BLOCK, "dfs: {scale_bounds: [1.0e-300, 2.0e-300]}"), seed=0)  # was ZeroDivisionError
@example(text=TOY + 'zoo: {path: "\\0"}\n', seed=0)  # was ValueError: embedded null byte
@example(
    text=TOY.replace('ToyFitnessWorker"}', 'ToyFitnessWorker", timeout: 1.0e+300}'), seed=0
)  # was OverflowError after the run was made  # noqa: E501
@example(text=TOY.encode() + b"# \xff\n", seed=0)  # was UnicodeDecodeError: the space file is not UTF-8
def test_fuzzed_spaces_through_the_cli(root, scratch, text, seed):
    _cli_search(root, scratch, text, seed)


@pytest.mark.slow
@settings(max_examples=200, **FUZZ)
@given(text=yaml_text(edited(BASES, SCHEMA, max_edits=5)), seed=SEEDS)
def test_fuzzed_spaces_through_the_cli_many(root, scratch, text, seed):
    _cli_search(root, scratch, text, seed)


def test_a_config_claiming_more_layers_than_its_weights_is_refused(tmp_path):
    """A crafted config.json (num_hidden_layers: 10**9 over 4 layers of weights) once made a
    layer-granularity PS space build a billion genes; now binding stops at once, naming the file."""
    import json

    models = make_models(tmp_path / "models")
    config = json.loads((models["a"] / "config.json").read_text())
    (models["a"] / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    text = TOY.replace("granularity: 2", "granularity: layer")
    with pytest.raises(
        EvomergeError,
        match=r"models\[0\]: config.json of .* says num_hidden_layers: 1000000000 but its weights hold 4 layers",
    ):  # noqa: E501
        SearchSpace(parse_space(parse_yaml(text, "space.yaml")), root=tmp_path)
