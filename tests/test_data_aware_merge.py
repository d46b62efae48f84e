"""Data-aware methods end to end: YAML -> `evomerge merge` on real (zoo and tiny random) models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.cli.app import app
from evomerge.merge.data_aware import prepare as prepare_module
from evomerge.merge.data_aware.permutation import permutation_spec, permute_state, random_permutations
from evomerge.merge.data_aware.repair import gpt2_points, llama_points, rotary_pair_rms, unit_statistics
from evomerge.merge.runner import merge_from_file
from evomerge.zoo.models import build_tokenizer

torch.set_num_threads(1)
DATA_AWARE = ("fisher", "regmean", "rebasin", "repair")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def permuted_copy(src: Path, dst: Path, seed: int) -> dict[str, torch.Tensor]:
    """A copy of a model directory with every permutation group shuffled (a function-preserving relabelling)."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    family = "gpt2" if config["model_type"] == "gpt2" else "llama"
    spec = permutation_spec(family, config, {k: tuple(v.shape) for k, v in state.items()}, residual=True)
    perms = random_permutations(spec, seed, move_all=True)  # no group left as it was
    save_file(permute_state(state, spec, perms), dst / "model.safetensors", metadata={"format": "pt"})
    return perms


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def rebasin_recipe(tmp_path: Path, a: Path, b: Path, t: float) -> Path:
    return write(
        tmp_path / f"rebasin_{t}.yaml",
        f"merge_method: rebasin\nbase_model: {a}\nmodels:\n  - model: {b}\nparameters: {{t: {t}}}\n",
    )


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_merge_help_lists_the_data_aware_methods():
    result = CliRunner().invoke(app, ["merge", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in DATA_AWARE:
        assert f"{name}:" in result.output


def test_zoo_permutation_keeps_outputs_and_rebasin_recovers_it_exactly(mini_zoo, tmp_path):
    base = mini_zoo / "base"
    permuted_copy(base, tmp_path / "permuted", seed=3)
    ids = torch.randint(4, 44, (3, 12))
    assert torch.allclose(logits(base, ids), logits(tmp_path / "permuted", ids), atol=1e-4)
    assert not torch.equal(
        load_file(base / "model.safetensors")["model.layers.0.mlp.up_proj.weight"],
        load_file(tmp_path / "permuted/model.safetensors")["model.layers.0.mlp.up_proj.weight"],
    )
    merge_from_file(rebasin_recipe(tmp_path, base, tmp_path / "permuted", 1.0), tmp_path / "t1", progress=False)
    assert_same_weights(base, tmp_path / "t1")  # t = 1: B in A's basis, which is A itself
    merge_from_file(rebasin_recipe(tmp_path, base, tmp_path / "permuted", 0.0), tmp_path / "t0", progress=False)
    assert_same_weights(base, tmp_path / "t0")
    merge_from_file(rebasin_recipe(tmp_path, base, tmp_path / "permuted", 0.5), tmp_path / "t05", progress=False)
    assert_same_weights(base, tmp_path / "t05")  # the third merge reuses the cached permutation


def tiny_model(kind: str, out: Path, seed: int = 7) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=32, n_embd=24, n_layer=2, n_head=4))
    elif kind in ("granite", "gemma"):  # families whose files name the llama symmetry
        import transformers

        config_class = {"granite": transformers.GraniteConfig, "gemma": transformers.GemmaConfig}[kind]
        config = config_class(
            vocab_size=48,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # Gemma's norms start at zero; make them carry a permutation
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape))
    else:  # Llama with grouped-query attention: 4 query heads share 2 KV heads
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=48,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
                tie_word_embeddings=False,
            )
        )
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "granite", "gemma"])
def test_gpt2_and_gqa_permutations_are_symmetries_that_rebasin_undoes(kind, tmp_path):
    a = tiny_model(kind, tmp_path / "a")
    perms = permuted_copy(a, tmp_path / "b", seed=5)
    if kind != "gpt2":  # GQA: 2 KV groups of 2 query heads; both kinds of move are hidden in B
        assert perms["heads.0"].numel() == 2 and perms["qheads.0"].numel() == 4
        within = perms["qheads.0"] - 2 * perms["heads.0"].repeat_interleave(2)
        assert within.tolist() != [0, 1, 0, 1], "no query head was moved inside its KV group"
    ids = torch.randint(0, 48, (2, 10))
    assert torch.allclose(logits(a, ids), logits(tmp_path / "b", ids), atol=1e-4)
    merge_from_file(rebasin_recipe(tmp_path, a, tmp_path / "b", 1.0), tmp_path / "out", progress=False)
    assert_same_weights(a, tmp_path / "out")
    assert torch.equal(logits(a, ids), logits(tmp_path / "out", ids))


def calibration_block(**extra: object) -> str:
    fields = {"task": "toy_add", "split": "train", "examples": 32, "seq_len": 16, **extra}
    return "calibration:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in fields.items())


def two_expert_recipe(tmp_path: Path, zoo: Path, method: str, params: str, **calibration: object) -> Path:
    per_model = {str(zoo / "rev"): {"task": "toy_rev"}}
    return write(
        tmp_path / f"{method}.yaml",
        f"merge_method: {method}\nmodels:\n  - model: {zoo / 'add'}\n  - model: {zoo / 'rev'}\n"
        f"parameters: {params}\n" + calibration_block(per_model=per_model, **calibration),
    )


@pytest.mark.parametrize(("method", "params"), [("regmean", "{alpha: 0.9}"), ("fisher", "{epsilon: 1.0e-8}")])
def test_statistics_methods_run_from_yaml_and_reuse_the_cache(method, params, mini_zoo, tmp_path, monkeypatch):
    recipe = two_expert_recipe(tmp_path, mini_zoo, method, params)
    merge_from_file(recipe, tmp_path / "first", progress=False)
    first = load_file(tmp_path / "first/model.safetensors")
    add, rev = (load_file(mini_zoo / m / "model.safetensors") for m in ("add", "rev"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(first[q], (add[q] + rev[q]) / 2, atol=1e-4)  # the data moved the merge
    if method == "regmean":  # norms and the (tied) embedding are averaged
        for name in ("model.norm.weight", "model.embed_tokens.weight"):
            assert torch.allclose(first[name], (add[name] + rev[name]) / 2, atol=1e-6)

    calls = []
    original = prepare_module._compute_statistics
    monkeypatch.setattr(prepare_module, "_compute_statistics", lambda *a, **k: calls.append(1) or original(*a, **k))
    merge_from_file(recipe, tmp_path / "second", progress=False)
    assert calls == []  # model + data + settings unchanged: both models' statistics come from the cache
    assert_same_weights(tmp_path / "first", tmp_path / "second")
    merge_from_file(
        two_expert_recipe(tmp_path, mini_zoo, method, params, seq_len=12), tmp_path / "third", progress=False
    )
    assert len(calls) == 2  # other token data: recomputed for both models


def test_calibration_from_a_jsonl_file(mini_zoo, tmp_path):
    rows = [{"prompt": f"A:{a:02d}+{a:02d}=", "answer": f"{2 * a:03d}"} for a in range(20)] + [{"text": "C:abc=abc"}]
    data = write(tmp_path / "calib.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: regmean\nmodels:\n  - model: {mini_zoo / 'add'}\n"
        f"  - model: {mini_zoo / 'rev'}\ncalibration:\n  file: {data}\n"
        "  examples: 16\n  seq_len: 16\n",
    )
    merge_from_file(recipe, tmp_path / "out", progress=False)
    assert (tmp_path / "out/model.safetensors").is_file()


def repair_statistics(recipe: Path, out: Path, a: Path, b: Path, points: list) -> dict[str, dict]:
    """Per-point unit statistics of A, B and the repaired model on the recipe's calibration tokens."""
    from transformers import AutoModelForCausalLM

    plan = merge_from_file(recipe, out, progress=False)
    config = plan.recipe.model_extra["calibration"]
    tokens = prepare_module._tokens(plan, config, str(a), prepare_module._tokenizer(plan))
    return {
        name: unit_statistics(AutoModelForCausalLM.from_pretrained(path).eval(), tokens, points, 16)
        for name, path in (("a", a), ("b", b), ("out", out))
    }


# Tolerance of the statistics checks: the repaired model is rebuilt by the same fp32 operations that
# the repair pass measured, and statistics are summed in fp64, so only fp32 rounding of activations
# separates measured from goal (~1e-6 relative); 1e-4 leaves room for that and nothing else (an
# unrepaired unit is off by its collapse factor, tens of percent).
RTOL = 1e-4


def test_llama_repair_matches_the_interpolated_statistics(mini_zoo, tmp_path):
    """Every repaired unit of a Llama reaches (1 - t) stat_A + t stat_B on the calibration data: the
    RMS of the o_proj / down_proj inputs (scaled through those layers' columns, so the effective
    value is input x column scale) and the per-RoPE-pair RMS of the q and k outputs (rescaled rows)."""
    a, b = mini_zoo / "add", mini_zoo / "rev"
    recipe = write(
        tmp_path / "repair.yaml",
        f"merge_method: repair\nbase_model: {a}\nmodels:\n  - model: {b}\n"
        "parameters: {t: 0.25, permute: false}\n" + calibration_block(examples=48),
    )
    config = json.loads((a / "config.json").read_text())
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    points = llama_points(config, 2, sa)
    assert {p.match for p in points} == {"rotary_rms", "rms"}
    stats = repair_statistics(recipe, tmp_path / "out", a, b, points)
    merged = load_file(tmp_path / "out/model.safetensors")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for point in points:
        weight = point.layer_tensor
        axis = 0 if point.match == "rotary_rms" else 1
        scale = merged[weight].norm(dim=1 - axis) / (sa[weight] * 0.75 + sb[weight] * 0.25).norm(dim=1 - axis)
        assert (scale - 1).abs().max() > 1e-2, point.module  # the repair did something
        a_, b_, out = (stats[k][point.module] for k in ("a", "b", "out"))
        if point.match == "rotary_rms":
            reached = rotary_pair_rms(out.rms, head_dim)
            goal = 0.75 * rotary_pair_rms(a_.rms, head_dim) + 0.25 * rotary_pair_rms(b_.rms, head_dim)
        else:
            reached, goal = out.rms * scale, 0.75 * a_.rms + 0.25 * b_.rms
        assert torch.allclose(reached, goal.to(reached.dtype), rtol=RTOL, atol=1e-8), point.module
    v = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(merged[v], sa[v] * 0.75 + sb[v] * 0.25)  # unrepaired tensors: the plain interpolation


def test_gpt2_repair_matches_mean_and_std_of_q_k_v_and_mlp_units(tmp_path):
    """GPT-2's q|k and v thirds of c_attn are repaired at two points; both folds land in c_attn, so
    they must compose (a later fold replacing an earlier one leaves q and k collapsed)."""
    a, b = tiny_model("gpt2", tmp_path / "a", seed=7), tiny_model("gpt2", tmp_path / "b", seed=8)
    recipe = write(
        tmp_path / "repair.yaml",
        f"merge_method: repair\nbase_model: {a}\nmodels:\n  - model: {b}\n"
        "parameters: {t: 0.5, permute: false}\n" + calibration_block(examples=48),
    )
    config = json.loads((a / "config.json").read_text())
    points = gpt2_points(config, 2, "transformer.")
    stats = repair_statistics(recipe, tmp_path / "out", a, b, points)
    hidden = config["n_embd"]
    for point in points:
        a_, b_, out = (stats[k][point.module] for k in ("a", "b", "out"))
        units = slice(0, 2 * hidden) if point.module.endswith("c_attn") else slice(None)  # v: at c_proj
        for field in ("mean", "std"):
            goal = (getattr(a_, field) + getattr(b_, field))[units] / 2
            assert torch.allclose(getattr(out, field)[units], goal, rtol=RTOL, atol=1e-6), (point.module, field)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("merge_method: fisher\nmodels: [{model: A}, {model: B}]\n", "calibration: fisher needs calibration data"),
        (
            "merge_method: linear\nmodels: [{model: A, parameters: {weight: 1}}]\ncalibration: {task: toy_add}\n",
            "calibration: linear does not use calibration data",
        ),
        (
            "merge_method: regmean\nmodels: [{model: A}, {model: B}]\ncalibration: {task: toy_add, per_model: {C: "
            "{task: toy_rev}}}\n",
            "calibration.per_model.C: not a model of this recipe",
        ),
        (
            "merge_method: rebasin\nbase_model: A\nslices: [{sources: [{model: A, layer_range: [0, 2]}, {model: B, "
            "layer_range: [0, 2]}]}]\nparameters: {t: 0.5}\n",
            "slices: rebasin aligns whole models",
        ),
        (
            "merge_method: regmean\nmodels: [{model: A}, {model: B}]\ncalibration: {task: toy_add, examples: 0}\n",
            "calibration.examples",
        ),
        (
            "merge_method: regmean\nmodels: [{model: A}, {model: B}]\ncalibration: {task: toy_add, file: x.jsonl}\n",
            "give exactly one of task:",
        ),
        (
            "merge_method: rebasin\nbase_model: A\nmodels: [{model: B}]\nparameters: {t: 1.5}\n",
            "parameters.t: must be <= 1",
        ),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_the_field(recipe, message, tmp_path):
    path = write(tmp_path / "bad.yaml", recipe)
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1, result.output


def test_missing_calibration_file_is_one_line(mini_zoo, tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: fisher\nmodels:\n  - model: {mini_zoo / 'add'}\n"
        f"  - model: {mini_zoo / 'rev'}\ncalibration: {{file: nowhere.jsonl}}\n",
    )
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "calibration.file: 'nowhere.jsonl' not found" in result.output
    assert not (tmp_path / "out").exists()


def test_search_space_can_use_data_aware_methods(mini_zoo):
    from evomerge.merge.jobs import ModelCatalog
    from evomerge.merge.plan import plan_merge
    from evomerge.search.space import SearchSpace, parse_space

    calibration = {"task": "toy_add", "examples": 8, "seq_len": 16}
    space = SearchSpace(
        parse_space(
            {
                "models": [str(mini_zoo / "add"), str(mini_zoo / "rev")],
                "tasks": [{"name": "toy_add"}],
                "ps": {
                    "method": "regmean",
                    "genes": {"weight": [0.1, 1.0]},
                    "parameters": {"alpha": 0.5},
                    "calibration": calibration,
                },
            }
        )
    )
    assert space.names == ["all.add.weight", "all.rev.weight"]
    recipe = space.decode([0.3, 0.9])
    assert recipe.model_extra["calibration"].examples == 8
    plan_merge(recipe, ModelCatalog())
    rebasin = SearchSpace(
        parse_space(
            {
                "models": [str(mini_zoo / "rev")],
                "base_model": str(mini_zoo / "add"),
                "tasks": [{"name": "toy_add"}],
                "ps": {"method": "rebasin", "genes": {"t": [0.0, 1.0]}},
            }
        )
    )
    assert rebasin.names == ["all.rev.t"]
    assert rebasin.decode([0.4]).models[0].parameters == {"t": 0.4}
