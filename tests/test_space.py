"""Search spaces: genes, decoding to recipes the planner accepts, exact per-layer values, DFS paths
and the scale fold (checked on real transformers models), and one-line validation errors."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from search_worker import make_models, write_space

from evomerge.errors import EvomergeError
from evomerge.merge.jobs import ModelCatalog
from evomerge.merge.plan import plan_merge
from evomerge.merge.recipe import dump_recipe, loads_recipe
from evomerge.search.space import SearchSpace, Step, load_space, parse_space, path_from_recipe, path_to_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("space_models"))


def ps_space(models, **ps) -> SearchSpace:
    config = parse_space(
        {
            "models": [str(models["a"]), str(models["b"])],
            "base_model": str(models["base"]),
            "tasks": [{"name": "toy_add"}],
            "ps": ps,
        }
    )
    return SearchSpace(config)


def random_genome(space: SearchSpace, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(g.low, g.high) for g in space.genes]


def test_whole_model_ps_is_a_models_recipe_with_one_scalar_per_model(models):
    space = ps_space(models, method="dare_ties")
    assert space.names == ["all.a.weight", "all.a.density", "all.b.weight", "all.b.density"]
    assert space.popsize == 4 + math.floor(3 * math.log(4))
    genome = [0.123456789, 0.9, 0.25, 0.5]
    recipe = space.decode(genome, seed=11)
    assert recipe.seed == 11 and recipe.slices is None
    assert [m.parameters for m in recipe.models] == [
        {"weight": 0.123457, "density": 0.9},
        {"weight": 0.25, "density": 0.5},
    ]
    assert loads_recipe(dump_recipe(recipe)) == recipe  # plain mergekit YAML, round trip


def test_per_layer_genes_reach_every_tensor_exactly(models):
    """Single-layer groups, separate attention/MLP genes and embedding genes: plan the decoded recipe
    and check the resolved weight and density of every tensor job against the gene it came from."""
    space = ps_space(models, method="ties", granularity="layer", split_attn_mlp=True, embedding_genes=True)
    genome = random_genome(space, 1)
    gene = {name: round(value, 6) for name, value in zip(space.names, genome, strict=True)}
    plan = plan_merge(space.decode(genome), ModelCatalog())
    labels = {plan.models[ref.model].path.name for job in plan.jobs for ref in job.inputs}
    assert labels == {"a", "b"}
    checked = 0
    for job in plan.jobs:
        for ref, params in zip(job.inputs, job.input_params, strict=True):
            label = plan.models[ref.model].path.name
            for kind in ("weight", "density"):
                if job.layer is None:
                    group = "embed" if "embed_tokens" in job.name else "head"
                    expected = gene[f"{group}.{label}.{kind}"]
                elif "attn" in job.name or "mlp" in job.name:
                    cls = "attn" if "attn" in job.name else "mlp"
                    expected = gene[f"L{job.layer}.{label}.{cls}.{kind}"]
                else:  # norms take the mean of the layer's two classes
                    pair = [gene[f"L{job.layer}.{label}.{c}.{kind}"] for c in ("attn", "mlp")]
                    expected = round(sum(pair) / 2, 6)
                assert params[kind] == expected, (job.name, label, kind)
                checked += 1
    assert checked == 2 * 2 * len(plan.jobs)


def test_blocks_of_k_layers(models):
    space = ps_space(models, method="task_arithmetic", granularity=3)
    assert [n for n in space.names if n.endswith("a.weight")] == ["L0-2.a.weight", "L3.a.weight"]
    recipe = space.decode(random_genome(space))
    assert [s.sources[1].layer_range for s in recipe.slices] == [(0, 3), (3, 4)]
    assert recipe.seed is None  # task arithmetic is not random: no seed in the recipe


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "task_arithmetic", "linear", "della", "breadcrumbs", "nuslerp", "multislerp"]
)
def test_each_ps_method_decodes_to_a_plannable_recipe(models, method):
    space = ps_space(models, method=method, granularity=2)
    plan_merge(space.decode(random_genome(space, 3), seed=5), ModelCatalog())


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_spherical_ps_methods_expose_weight_genes_and_use_the_base(models, method):
    """Their only per-model parameter is `weight`; with a base_model the slerp runs on task vectors."""
    space = ps_space(models, method=method)
    assert [g.name for g in space.genes] == ["all.a.weight", "all.b.weight"]
    recipe = space.decode([0.2, 0.7], seed=None)
    assert recipe.base_model == str(models["base"])
    assert [m.parameters for m in recipe.models] == [{"weight": 0.2}, {"weight": 0.7}]
    plan = plan_merge(recipe, ModelCatalog())
    assert all(job.base is not None and len(job.inputs) == 2 for job in plan.jobs)


def dfs_space(models, **dfs) -> SearchSpace:
    config = parse_space({"models": [str(models["a"]), str(models["b"])], "tasks": [{"name": "toy_add"}], "dfs": dfs})
    return SearchSpace(config)


def test_dfs_genome_to_path_slices_and_folded_scales(models):
    space = dfs_space(models, repeats=2, scales="layer_pair")
    slots = 2 * (4 + 4)
    # W over all 8 x 8 layer pairs but each model's own successor (a.i -> a.i+1, 3 per model)
    assert len(space.genes) == slots + 8 * 8 - 2 * 3
    names = space.names
    assert "W.a.1->a.2" not in names and "W.a.3->a.0" in names and "W.a.0->a.0" in names
    genome = [-0.5] * slots + [1.0] * (8 * 8 - 2 * 3)
    on = {"I.r0.a.1", "I.r0.a.2", "I.r0.b.2", "I.r0.b.3", "I.r1.a.3"}
    for name in on:
        genome[names.index(name)] = 0.5
    genome[names.index("W.a.2->b.2")] = 1.6
    genome[names.index("W.b.3->a.3")] = 0.8
    # x0 is model a alone: its first repeat between the fixed first and last layers
    assert space.layout.path(space.x0) == [Step(0, 0), Step(0, 1), Step(0, 2), Step(0, 3)]
    path = space.layout.path(genome)
    assert path == [Step(0, 0), Step(0, 1), Step(0, 2), Step(1, 2, 1.6), Step(1, 3), Step(0, 3, 0.8), Step(0, 3)]
    recipe = space.decode(genome)
    plan_merge(recipe, ModelCatalog())
    rows = [(s.sources[0].model, s.sources[0].layer_range, s.sources[0].parameters) for s in recipe.slices]
    a, b = str(models["a"]), str(models["b"])
    assert [(m, r) for m, r, _ in rows] == [(a, (0, 3)), (b, (2, 4)), (a, (3, 4)), (a, (3, 4))]
    assert rows[0][2] is None
    c1, c2 = 1.6, 1.6 * 0.8
    for (_, _, params), c in zip(rows[1:], [c1, c2, c2], strict=True):
        assert [(f.filter, f.value) for f in params["scale"]] == [("o_proj", 1 / c), ("down_proj", 1 / c)]
    back = path_from_recipe(recipe, ("o_proj",))
    assert [(m, layer) for m, layer, _ in back] == [((a, b)[s.model], s.layer) for s in path]
    assert [s for *_, s in back] == pytest.approx([s.scale for s in path], rel=1e-12)


def test_dfs_max_path_length_keeps_the_last_anchor_layer(models):
    space = dfs_space(models, repeats=1, max_path_length=3, scales="model_pair")
    assert space.names[-4:] == ["W.a->a", "W.a->b", "W.b->a", "W.b->b"]
    genome = [0.5] * 8 + [1.0] * 4
    assert [(s.model, s.layer) for s in space.layout.path(genome)] == [(0, 0), (0, 0), (0, 3)]


def _tiny_llama(seed: int, path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-12,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def test_dfs_export_matches_the_scaled_path_on_real_models(tmp_path):
    """The passthrough recipe (scales folded into o_proj/down_proj, merged to disk by the merge engine)
    gives the logits of the path run with scaled inputs at each transition (forward pre-hooks)."""
    import copy

    from transformers import AutoModelForCausalLM

    from evomerge.merge.runner import merge_from_file

    a, b = _tiny_llama(0, tmp_path / "a"), _tiny_llama(1, tmp_path / "b")
    steps = [Step(0, 0), Step(0, 1), Step(1, 1, 1.7), Step(1, 2), Step(0, 1, 0.6), Step(0, 2)]
    recipe = path_to_recipe(steps, [str(tmp_path / "a"), str(tmp_path / "b")], ("o_proj", "down_proj"))
    (tmp_path / "dfs.yaml").write_text(dump_recipe(recipe))
    merge_from_file(tmp_path / "dfs.yaml", tmp_path / "merged", progress=False, echo=lambda *_: None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()

    reference = copy.deepcopy(a)
    layers = []
    for index, step in enumerate(steps):
        layer = copy.deepcopy((a, b)[step.model].model.layers[step.layer])
        layer.self_attn.layer_idx = index
        if step.scale != 1.0:

            def scale_input(module, args, kwargs, s=step.scale):
                if args:
                    return (args[0] * s, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

            layer.register_forward_pre_hook(scale_input, with_kwargs=True)
        layers.append(layer)
    reference.model.layers = torch.nn.ModuleList(layers)
    reference.config.num_hidden_layers = len(layers)
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(tokens, use_cache=False).logits
        got = merged(tokens, use_cache=False).logits
        plain = copy.deepcopy(reference)
        for layer in plain.model.layers:
            layer._forward_pre_hooks.clear()
        unscaled = plain(tokens, use_cache=False).logits
    assert (want - unscaled).abs().max() > 1e-2  # the scales matter
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


# -- validation: one line naming the field, exit 2, nothing written --------------------------------

BAD = {
    "unknown key": (
        "models: [a]\ntasks: [{name: t}]\nps: {method: ties}\nbase_model: base\nbudgett: {}\n",
        "budgett: unknown key",
    ),
    "bad method": (
        "models: [a]\nbase_model: base\ntasks: [{name: t}]\nps: {method: slerpy}\n",
        "ps.method: unknown PS method 'slerpy'",
    ),
    "bounds": (
        "models: [a]\nbase_model: base\ntasks: [{name: t}]\nps: {genes: {weight: [1, 0]}}\n",
        "ps.genes: weight: bounds must be [low, high] with low < high",
    ),
    "density on task_arithmetic": (
        "models: [a]\nbase_model: base\ntasks: [{name: t}]\nps: {method: task_arithmetic, genes: {density: [0, 1]}}\n",
        "ps.genes.density: not a per-model numeric parameter of task_arithmetic",
    ),
    "report split": (
        "models: [a]\nbase_model: base\ntasks: [{name: t}]\nsplits: {search: test}\nps: {}\n",
        "splits.report: 'test' is also searched or used for selection",
    ),
    "missing model": (
        "models: [nope]\nbase_model: base\ntasks: [{name: t}]\nps: {}\n",
        "models[0]: model 'nope' not found",
    ),
    "negative scale": (
        "models: [a, b]\ntasks: [{name: t}]\ndfs: {scale_bounds: [-1, 2]}\n",
        "dfs.scale_bounds: must be [low, high] with 0 < low < high",
    ),
    "anchor": ("models: [a, b]\ntasks: [{name: t}]\ndfs: {anchor: c}\n", "dfs.anchor: 'c' is not one of"),
    "no kind": ("models: [a]\ntasks: [{name: t}]\n", "ps/dfs: give a `ps:` block"),
    "x0": (
        "models: [a]\nbase_model: base\ntasks: [{name: t}]\nps: {x0: {weight: 3}}\n",
        "ps.x0.weight: 3.0 is outside the bounds [0.0, 1.0]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_name_the_field(models, tmp_path, case):
    text, message = BAD[case]
    root = models["a"].parent
    path = write_space(root / f"bad_{case.replace(' ', '_')}.yaml", text)
    with pytest.raises(EvomergeError) as info:
        load_space(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_rejects_a_bad_space_with_one_line_and_writes_nothing(models, tmp_path):
    path = write_space(models["a"].parent / "bad_cli.yaml", BAD["bad method"][0])
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "evomerge.cli.app", "search", str(path), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {BAD['bad method'][1]}")
    assert not run_dir.exists()


def test_dfs_jumps_inside_one_model_get_their_own_scale(models):
    """The paper's W covers every transition: a repeat going back inside model a is scaled by
    W.a->a (model_pair); a model's own next layer is not (it is the flow it was trained on)."""
    space = dfs_space(models, repeats=2, scales="model_pair")
    names = space.names
    genome = [-0.5] * 16 + [1.0] * 4
    for name in ("I.r0.a.1", "I.r0.a.2", "I.r1.a.1"):
        genome[names.index(name)] = 0.5
    genome[names.index("W.a->a")] = 1.7
    path = space.layout.path(genome)
    assert path == [Step(0, 0), Step(0, 1), Step(0, 2), Step(0, 1, 1.7), Step(0, 3, 1.7)]
