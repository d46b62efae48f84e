"""In-memory materialization equals `evomerge merge`: bit for bit for parameter-space recipes, and
up to the norm epsilon for layer paths (DFS), whose scales are folded into output projections on
export and applied to the hidden state in memory.

One `Materializer` serves every recipe of a test in sequence, so a method that overwrote a
resident source tensor or a stale weight left in the reused target model would show up as a
mismatch in a later recipe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.candidates.materialize import Materializer, ModuleSink
from evomerge.merge.methods.registry import REGISTRY
from evomerge.merge.recipe import Recipe, dump_recipe, parse_recipe
from evomerge.merge.runner import merge_from_file
from evomerge.search.space.dfs import Step, path_to_recipe

torch.set_num_threads(1)

SEED = 7


def ps_recipes(zoo: Path) -> dict[str, dict]:
    """One recipe per parameter-space method, with gradients and filters so per-tensor parameters
    vary; plus `dtype` variants (inputs rounded before the fp32 math, cached deltas included)."""
    base, add, rev, shift = (str(zoo / n) for n in ("base", "add", "rev", "shift"))
    density = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.2, 0.7]}, {"value": 0.5}]

    def experts(**extra):
        return [
            {"model": add, "parameters": {"weight": 0.8, "density": density, **extra}},
            {"model": rev, "parameters": {"weight": [0.4, 0.9], "density": 0.6, **extra}},
            {"model": shift, "parameters": {"weight": 0.5, "density": 0.4, **extra}},
        ]

    def task_vectors(method, **extra):
        recipe = {"merge_method": method, "base_model": base, "models": experts(**extra)}
        if method.startswith(("dare", "della")):  # the fast paths' rescaling; the default (L1) runs eager
            recipe["parameters"] = {"rescale_norm": "inverse"}
        return recipe

    recipes = {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": add, "parameters": {"weight": 0.5}},
                {"model": rev, "parameters": {"weight": [0.2, 0.8]}},
                {"model": shift, "parameters": {"weight": 0.3}},
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": add}],
            "parameters": {"t": [0.1, 0.9]},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.9},
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in ((add, 0.7), (rev, [0.3, 0.6]), (shift, 0.5))
            ],
        },
        "ties": task_vectors("ties"),
        "dare_ties": task_vectors("dare_ties"),
        "dare_linear": task_vectors("dare_linear"),
        "breadcrumbs": task_vectors("breadcrumbs", gamma=0.05),
        "breadcrumbs_ties": task_vectors("breadcrumbs_ties", gamma=0.05),
        "della": task_vectors("della", epsilon=0.1),
        "della_linear": task_vectors("della_linear", epsilon=0.1),
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": add}, {"model": rev}, {"model": shift}],
        },
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": add}]},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": add, "parameters": {"scale": 0.9}}]},
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "parameters": {"select_topk": [0.3, 0.9]},
            "models": [{"model": add}, {"model": rev}, {"model": shift}],
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "parameters": {"nuslerp_flatten": False},
            "models": [
                {"model": add, "parameters": {"weight": [0.2, 0.9]}},
                {"model": rev, "parameters": {"weight": 0.5}},
            ],
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": [
                {"model": add, "parameters": {"weight": 0.5}},
                {"model": rev, "parameters": {"weight": [0.2, 0.8]}},
                {"model": shift, "parameters": {"weight": 0.3}},
            ],
        },
        "karcher": {"merge_method": "karcher", "base_model": base, "models": [{"model": add}, {"model": rev}]},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": add}],
            "parameters": {"t": 0.01},
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": add}, {"model": rev}, {"model": shift}],
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "parameters": {"epsilon": 0.01, "r": 0.5},
            "models": [{"model": add}, {"model": rev}, {"model": shift}],
        },
        "ties@bf16-inputs": {**task_vectors("ties"), "dtype": "bfloat16", "out_dtype": "float32"},
        "della@bf16": {**task_vectors("della", epsilon=0.1), "dtype": "bfloat16"},
        # mergekit's L1 rescaling (the default of DARE and DELLA): ratios from ATen sums, then the kernel
        "dare_ties@l1": {**task_vectors("dare_ties"), "parameters": {}},
        "dare_linear@l1": {**task_vectors("dare_linear"), "parameters": {}},
        "della@l1": {**task_vectors("della", epsilon=0.1), "parameters": {}},
    }
    covered = {name.split("@")[0] for name in recipes}
    # Data-aware methods (a calibration pre-pass, `extra["prepare"]`) run through the same run_plan
    # but need calibration data; their equality cases live with their tests.
    plain = {name for name, method in REGISTRY.items() if "prepare" not in method.extra}
    assert plain <= covered, f"methods without an equality case: {plain - covered}"
    return recipes


def file_merge(recipe: dict | Recipe, out: Path, seed: int | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yml"
    path.write_text(dump_recipe(recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)))
    merge_from_file(path, out, seed=seed, progress=False)
    return out


def assert_same_state(model: torch.nn.Module, written: dict[str, torch.Tensor], label: str) -> None:
    state = model.state_dict()
    for name, tensor in written.items():
        assert state[name].dtype == tensor.dtype, f"{label}: {name} dtype"
        assert torch.equal(state[name], tensor), f"{label}: {name} differs from the file merge"
    for extra in set(state) - set(written):  # only aliases of written tensors (a tied lm_head)
        assert any(state[extra].data_ptr() == state[n].data_ptr() for n in written), f"{label}: {extra}"


def test_every_parameter_space_method_equals_the_file_merge_bit_for_bit(mini_zoo: Path, tmp_path: Path) -> None:
    materializer = Materializer([mini_zoo / n for n in ("base", "add", "rev", "shift")])
    snapshot = {(p, n): t.clone() for p, m in materializer._residents.items() for n, t in m.tensors.items()}
    flat_methods = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear"}
    for label, recipe in ps_recipes(mini_zoo).items():
        before = materializer.flat.candidates
        candidate = materializer.apply(recipe, seed=SEED)
        assert candidate.mode == "in_place", label
        # below the compile threshold the task-vector methods run as one flat pass (flat.py)
        flat = label.split("@")[0] in flat_methods
        assert (materializer.flat.candidates > before) == flat, label
        written = load_file(
            str(file_merge(recipe, tmp_path / label.replace("@", "-"), seed=SEED) / "model.safetensors")
        )
        assert_same_state(candidate.model, written, label)
    # The resident sources are untouched and task vectors were cached (and reused) by the methods.
    for (path, name), before in snapshot.items():
        assert torch.equal(materializer._residents[path].tensors[name], before), f"{path}: {name} was modified"
    assert len(materializer.deltas) > 0


def test_above_the_flat_bound_candidates_run_tensor_by_tensor_with_the_same_bits(
    mini_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evomerge.candidates.materialize as materialize_module

    sources = [mini_zoo / n for n in ("base", "add", "rev", "shift")]
    recipes = ps_recipes(mini_zoo)
    flat = Materializer(sources)
    expected = {
        label: {k: v.clone() for k, v in flat.apply(recipes[label], seed=SEED).model.state_dict().items()}
        for label in ("ties", "della")
    }
    assert flat.flat.candidates == 2
    monkeypatch.setattr(materialize_module, "FLAT_MAX_PARAMETERS", 0)
    per_tensor = Materializer(sources)
    for label, state in expected.items():
        assert_same_state(per_tensor.apply(recipes[label], seed=SEED).model, state, label)
    assert per_tensor.flat.candidates == 0


def test_a_recipe_that_fails_to_plan_names_the_field(mini_zoo: Path) -> None:
    from evomerge.errors import EvomergeError

    materializer = Materializer([mini_zoo / "base"])
    bad = {
        "merge_method": "ties",
        "base_model": str(mini_zoo / "base"),
        "models": [{"model": str(mini_zoo / "add"), "parameters": {"weight": 1.0, "density": 1.5}}],
    }
    with pytest.raises(EvomergeError, match="density"):
        materializer.apply(bad)


def test_module_sink_refuses_a_plan_that_leaves_weights_unwritten(mini_zoo: Path) -> None:
    materializer = Materializer([mini_zoo / "base"])
    plan = materializer.plan(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(mini_zoo / "base"), "layer_range": [0, 1]}]}],
        }
    )
    full = materializer.apply(
        {"merge_method": "linear", "models": [{"model": str(mini_zoo / "base"), "parameters": {"weight": 1.0}}]}
    ).model
    with pytest.raises(ValueError, match="does not write"):
        ModuleSink(full).begin(plan)  # a 1-layer plan cannot fill a 2-layer model


# ---- layer stacking (DFS) ----------------------------------------------------------------------

PATH = [Step(0, 0), Step(0, 1), Step(1, 1, 0.7), Step(1, 2), Step(0, 2, 1.6), Step(1, 3, 1.3), Step(0, 3, 0.8)]
PROJECTIONS = ("o_proj", "down_proj")


def random_llamas(root: Path, eps: float, count: int = 2) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=eps,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        path = root / f"llama{seed}"
        LlamaForCausalLM(config).save_pretrained(path)
        paths.append(str(path))
    return paths


def exported_model(recipe, out: Path):
    from transformers import AutoModelForCausalLM

    file_merge(recipe, out)
    return AutoModelForCausalLM.from_pretrained(out).eval()


# Tolerances. The fold is exact in real arithmetic when the norm epsilon is 0; what is left is fp32
# rounding of the scaled projections (7 steps: ~1e-7 relative each, measured 2.4e-7 on logits of
# size ~0.6). With eps = 1e-6 the norms see c * h instead of h, so RMSNorm changes by about
# eps / mean(h^2) relatively (activations of random models are small: measured 2.8e-4).
@pytest.mark.parametrize(("eps", "tolerance"), [(1e-12, 1e-5), (1e-6, 2e-3)])
def test_a_layer_path_runs_on_resident_layers_and_matches_the_exported_model(
    tmp_path: Path, eps: float, tolerance: float
) -> None:
    paths = random_llamas(tmp_path, eps)
    recipe = path_to_recipe(PATH, paths, PROJECTIONS)
    materializer = Materializer(paths)
    candidate = materializer.apply(recipe)
    assert candidate.mode == "stacked"

    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(0))
    reference = exported_model(recipe, tmp_path / "exported")
    with torch.no_grad():
        got, want = candidate.model(ids).logits, reference(ids).logits
    assert (got - want).abs().max().item() <= tolerance

    # No weight was copied: every parameter of the candidate is a resident source tensor.
    resident = {t.data_ptr() for m in materializer._residents.values() for t in m.tensors.values()}
    assert all(p.data_ptr() in resident for p in candidate.model.parameters())
    # Each path position has its own KV-cache slot (layer 1 of model 1 ... appear once each here;
    # generation with the cache equals generation without it).
    with torch.no_grad():
        cached = candidate.model.generate(
            ids[:, :8], max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids[:, :8])
        )
        uncached = candidate.model.generate(
            ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=False, attention_mask=torch.ones_like(ids[:, :8])
        )
    assert torch.equal(cached, uncached)


def test_a_path_that_repeats_a_layer_keeps_one_cache_slot_per_position(tmp_path: Path) -> None:
    paths = random_llamas(tmp_path, 1e-12, count=1)
    steps = [Step(0, 0), Step(0, 1), Step(0, 1), Step(0, 2), Step(0, 1), Step(0, 3)]
    materializer = Materializer(paths)
    candidate = materializer.apply(path_to_recipe(steps, paths, PROJECTIONS))
    model = candidate.model
    indices = [layer.self_attn.layer_idx for layer in model.model.layers]
    assert indices == list(range(len(steps)))
    source_layers = materializer._residents[Path(paths[0]).resolve()].module.model.layers
    assert [layer.self_attn.layer_idx for layer in source_layers] == [0, 1, 2, 3]  # sources untouched
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=mask)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, attention_mask=mask)
        reference = exported_model(path_to_recipe(steps, paths, PROJECTIONS), tmp_path / "exported")
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    assert torch.equal(cached, uncached)


def test_a_passthrough_recipe_that_is_not_a_folded_path_is_copied_and_exact(mini_zoo: Path, tmp_path: Path) -> None:
    base, add = str(mini_zoo / "base"), str(mini_zoo / "add")
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]}]},
            {
                "sources": [
                    {"model": add, "layer_range": [1, 2], "parameters": {"scale": [{"filter": "q_proj", "value": 0.5}]}}
                ]
            },
        ],
    }
    materializer = Materializer([base, add])
    candidate = materializer.apply(recipe)
    assert candidate.mode == "in_place"
    written = load_file(str(file_merge(recipe, tmp_path / "copy") / "model.safetensors"))
    assert_same_state(candidate.model, written, "scaled q_proj")


def test_search_space_dfs_genomes_materialize_like_their_export(mini_zoo: Path, tmp_path: Path) -> None:
    """The decoder of the search (space.py) and the materializer agree on the recipe shape."""
    from evomerge.search.space import SearchSpace, parse_space

    config = parse_space(
        {
            "models": [str(mini_zoo / "add"), str(mini_zoo / "rev")],
            "tasks": [{"name": "toy_add"}],
            "dfs": {"repeats": 2, "scales": "layer_pair"},
        }
    )
    space = SearchSpace(config)
    materializer = Materializer(space.source_models)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 48, (2, 12), generator=generator)
    for trial in range(3):
        genome = [
            lo + (hi - lo) * float(torch.rand((), generator=generator))
            for lo, hi in zip(space.lower, space.upper, strict=True)
        ]
        recipe = space.decode(genome)
        candidate = materializer.apply(recipe)
        assert candidate.mode == "stacked"
        reference = exported_model(recipe, tmp_path / f"genome{trial}")
        with torch.no_grad():
            diff = (candidate.model(ids).logits - reference(ids).logits).abs().max().item()
        assert diff <= 2e-3  # zoo models use rms_norm_eps = 1e-6 (see the tolerance note above)
