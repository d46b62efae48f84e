"""The architecture matrix: every family in evomerge/io/architectures/ on a tiny random model of it.

Per family: a TIES merge equal to mergekit 0.1.5 where mergekit runs (the default suite's one merge
per family); slow: a SLERP merge (mergekit parity), a layer stack that transformers loads with the
right per-layer config (mergekit parity where mergekit can stack), in-memory candidates bit-equal
to the disk merge, DFS scales folded into the family's residual_outputs (exact), the zero-copy DFS
candidate equal to its export, and a short PS search. Default suite too: rebasin undoes a hidden
permutation of every kind (KV groups, q heads within a group, MLP units, residual stream).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb_from
from safetensors.torch import load_file

from evomerge.candidates.materialize import Materializer
from evomerge.errors import EvomergeError
from evomerge.io.architecture import detect_architecture, known_architectures
from evomerge.merge.recipe import Recipe, dump_recipe
from evomerge.merge.runner import merge_from_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# family case -> (transformers config class, its settings on top of COMMON: biases and per-layer
# lists where the family has them; tied embeddings are each config's default)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {"layer_types": ALTERNATING, "use_sliding_window": True, "sliding_window": 16}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 16, "layer_types": ALTERNATING}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"residual_multiplier": 0.5, "embedding_multiplier": 2.0}),
    "cohere": ("CohereConfig", {"use_qk_norm": True}),  # mergekit 0.1.5 requires the q/k norms of Command R+
    "stablelm": ("StableLmConfig", {"use_qkv_bias": True}),
    "starcoder2": ("Starcoder2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5}),
    "gpt2": ("GPT2Config", {}),
}
GPT2_KW = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)

# Where mergekit 0.1.5 cannot run a case (under transformers 5), with the reason; the tests assert
# that it still fails, so a skip never hides a working comparison.
MERGEKIT_FAILS = {
    "gpt_neox": "mergekit's gpt-neox.json requires attention.bias/masked_bias buffers transformers 5 does not save",
}
MERGEKIT_STACK_FAILS = {
    **MERGEKIT_FAILS,
    "qwen2": "mergekit keeps layer_types at the source length (transformers 5 refuses the config)",
    "gemma2": "mergekit keeps layer_types at the source length (transformers 5 refuses the config)",
    "gemma3": "mergekit keeps layer_types at the source length (transformers 5 refuses the config)",
    "qwen3": "mergekit keeps layer_types at the source length (transformers 5 refuses the config)",
}
TOLERANCE = 1e-5


def build(case: str, path: Path, seed: int, base: Path | None = None) -> Path:
    import transformers

    class_name, extra = CASES[case]
    settings = GPT2_KW if case == "gpt2" else {**COMMON, **extra}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**settings))
    if base is not None:
        perturb_from(model, base, seed, 0.02)
    else:  # no all-zero tensor (zero-initialised biases, Gemma's norms), as in a trained model: SLERP
        # falls back to lerp on a zero-norm tensor, mergekit 0.1.5 does not (docs/merge.md)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per case: a base and two 'fine-tunes' (base + seeded noise), built on first use."""
    built: dict[str, dict[str, Path]] = {}

    def get(case: str) -> dict[str, Path]:
        if case not in built:
            root = tmp_path_factory.mktemp(case)
            base = build(case, root / "base", 0)
            built[case] = {"base": base, **{f"ft{i}": build(case, root / f"ft{i}", i, base) for i in (1, 2)}}
        return built[case]

    return get


def ties(models: dict[str, Path]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "dtype": "float32",
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(models["ft2"]), "parameters": {"weight": [0.2, 0.9], "density": 0.6}},
        ],
    }


def slerp(models: dict[str, Path]) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": str(models["base"]),
        "dtype": "float32",
        "models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}],
        "parameters": {"t": [0.2, 0.8]},
    }


def stack(models: dict[str, Path]) -> dict:
    """Layers 0-2 of ft1 then 1-3 of ft2: six layers, so per-layer lists must be rebuilt."""
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(models["ft2"]), "layer_range": [1, 4]}]},
        ],
    }


def evomerge(recipe: dict | Recipe, out: Path) -> dict[str, torch.Tensor]:
    path = out.parent / f"{out.name}.yml"
    path.write_text(dump_recipe(recipe) if isinstance(recipe, Recipe) else yaml.safe_dump(recipe))
    merge_from_file(path, out, progress=False)
    return read_all(out)


def mergekit(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options)
    return read_all(out)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_parity(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: Path) -> None:
    assert ours.keys() == theirs.keys()
    assert all(ours[name].shape == theirs[name].shape for name in ours)
    worst = {name: (ours[name].double() - theirs[name].double()).abs().max().item() for name in ours}
    assert max(worst.values()) <= TOLERANCE, {
        name: f"{value:.3g}" for name, value in worst.items() if value > TOLERANCE
    }
    first = read_all(base)
    changed = max((ours[n].double() - first[n].double()).abs().max().item() for n in ours if n in first)
    assert changed > 100 * TOLERANCE, "the merge changed nothing; the comparison would be vacuous"


def compare_with_mergekit(case: str, recipe: dict, ours: dict[str, torch.Tensor], out: Path, base: Path) -> None:
    if case in MERGEKIT_FAILS:
        with pytest.raises(RuntimeError, match="required but not present"):
            mergekit(recipe, out)
        pytest.skip(f"no mergekit parity for {case}: {MERGEKIT_FAILS[case]}")
    assert_parity(ours, mergekit(recipe, out), base)


def logits(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.arange(1, 13).reshape(2, 6)).logits


def test_every_family_file_is_covered_by_a_case() -> None:
    covered = {"mistral": "llama", "qwen2": "llama"}
    assert {covered.get(c, c) for c in CASES} == set(known_architectures())


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_ties_merge_equals_mergekit(case: str, zoo, tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    models = zoo(case)
    ours = evomerge(ties(models), tmp_path / "ours")
    assert torch.isfinite(logits(tmp_path / "ours")).all()
    compare_with_mergekit(case, ties(models), ours, tmp_path / "theirs", models["base"])


@pytest.mark.slow
@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_slerp_merge_equals_mergekit(case: str, zoo, tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    models = zoo(case)
    ours = evomerge(slerp(models), tmp_path / "ours")
    compare_with_mergekit(case, slerp(models), ours, tmp_path / "theirs", models["base"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_layer_stack_loads_with_its_per_layer_config(case: str, zoo, tmp_path: Path) -> None:
    models = zoo(case)
    evomerge(stack(models), tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    source = json.loads((models["ft1"] / "config.json").read_text())
    arch = detect_architecture(config, case)
    assert config[arch.num_layers_key] == 6
    for key in arch.layer_config_lists:
        if key in source:
            assert config[key] == source[key][0:3] + source[key][1:4], key
    assert torch.isfinite(logits(tmp_path / "ours")).all()
    if case in MERGEKIT_STACK_FAILS:
        with pytest.raises(Exception):  # noqa: B017  (whichever error mergekit or transformers raises)
            mergekit(stack(models), tmp_path / "theirs")
            logits(tmp_path / "theirs")
    else:
        assert_parity(read_all(tmp_path / "ours"), mergekit(stack(models), tmp_path / "theirs"), models["ft1"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", [ties, stack])
def test_in_memory_candidate_equals_the_disk_merge(case: str, method, zoo, tmp_path: Path) -> None:
    models = zoo(case)
    written = evomerge(method(models), tmp_path / "ours")
    candidate = Materializer([models[n] for n in ("base", "ft1", "ft2")]).apply(method(models))
    state = candidate.model.state_dict()
    written = {candidate.plan.models[0].arch.module_name(n): t for n, t in written.items()}
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    for extra in set(state) - set(written):  # only aliases of written tensors (a tied lm_head)
        assert any(state[extra].data_ptr() == state[n].data_ptr() for n in written), extra


def test_an_unknown_architecture_says_how_to_add_its_file() -> None:
    with pytest.raises(EvomergeError) as error:
        detect_architecture({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}, "m")
    message = str(error.value)
    assert "\n" not in message
    assert "FalconForCausalLM" in message and "evomerge/io/architectures/<family>.json" in message


class LossWorker:
    """A search worker that materialises each candidate in memory (as the real worker does) and
    scores it by the negative loss on fixed tokens: cheap, but every evaluation runs the model."""

    def __init__(self, sources: list[str], tasks: list[dict], include_paths: list[str] | None = None):
        self.materializer = Materializer([Path(s) for s in sources])
        self.ids = torch.arange(1, 25).reshape(2, 12) % 90 + 1

    def evaluate(self, candidate):
        from evomerge.workers.candidate import EvalResult

        model = self.materializer.apply(candidate.payload["recipe"]).model
        with torch.no_grad():
            loss = float(model(self.ids, labels=self.ids).loss)
        name = candidate.payload["tasks"][0]["name"]
        return EvalResult.success(candidate.id, -loss, {f"{name}/acc": -loss, f"{name}/n": 24.0})


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_short_search_runs_on_the_family(case: str, zoo, tmp_path: Path) -> None:
    from evomerge.cli.search import run_search

    models = zoo(case)
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "models": [str(models["ft1"]), str(models["ft2"])],
                "base_model": str(models["base"]),
                "tasks": [{"name": "toy_add", "weight": 1.0}],
                "budget": {"max_evals": 4, "popsize": 2, "select_top_k": 1},
                "seed": 0,
                "worker": {"factory": "test_architectures:LossWorker"},
                "ps": {"method": "ties", "granularity": 2},
            }
        )
    )
    run_search(space, tmp_path / "run", workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    assert sum(r.get("phase", "search") == "search" for r in records) == 4


# A DFS path over the two fine-tunes: (model, layer, scale on the hidden state entering it).
PATH = [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 0.7), (1, 2, 1.0), (0, 2, 1.6), (1, 3, 1.3), (0, 3, 0.8)]


def load_with_tiny_eps(directory: Path):
    """The model with every norm epsilon at 1e-12: the scale fold is exact when eps is 0."""
    from transformers import AutoModelForCausalLM

    config = json.loads((directory / "config.json").read_text())
    config.update({k: 1e-12 for k, v in config.items() if ("eps" in k or "epsilon" in k) and isinstance(v, float)})
    (directory / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_dfs_scales_fold_into_the_residual_outputs(case: str, zoo, tmp_path: Path) -> None:
    """The exported path (scales folded into the family's residual_outputs) equals the unscaled
    path run with each layer's input hidden state multiplied by its scale."""
    from evomerge.search.space.dfs import Step, path_to_recipe

    models = zoo(case)
    arch = detect_architecture(json.loads((models["ft1"] / "config.json").read_text()), case)
    if not arch.residual_outputs:
        pytest.skip(f"{case}: no residual_outputs (a norm sits between the branch outputs and the residual add)")
    sources = [str(models["ft1"]), str(models["ft2"])]
    folded = path_to_recipe([Step(*s) for s in PATH], sources, arch.residual_outputs)
    plain = path_to_recipe([Step(m, layer) for m, layer, _ in PATH], sources, arch.residual_outputs)
    evomerge(folded, tmp_path / "folded")
    evomerge(plain, tmp_path / "plain")
    reference = load_with_tiny_eps(tmp_path / "plain")
    prefix = arch.layer_prefix(next(n for n in read_all(tmp_path / "plain") if arch.layer_pattern.match(n)))
    for layer, (_, _, scale) in zip(reference.get_submodule(prefix.rstrip(".")), PATH, strict=True):
        layer.register_forward_pre_hook(scaled_input(scale), with_kwargs=True)
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        got, want = load_with_tiny_eps(tmp_path / "folded")(ids).logits, reference(ids).logits
        unscaled = load_with_tiny_eps(tmp_path / "plain")(ids).logits
    tolerance = 1e-4 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tolerance
    assert (unscaled - want).abs().max().item() > 100 * tolerance, "the scales changed nothing: a vacuous check"


def scaled_input(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_dfs_candidate_runs_on_resident_layers_like_its_export(case: str, zoo, tmp_path: Path) -> None:
    import shutil

    from evomerge.search.space.dfs import Step, path_to_recipe

    sources = []
    for name in ("ft1", "ft2"):  # copies with tiny norm epsilons, where the fold is exact
        shutil.copytree(zoo(case)[name], tmp_path / name)
        load_with_tiny_eps(tmp_path / name)
        sources.append(str(tmp_path / name))
    arch = detect_architecture(json.loads((tmp_path / "ft1" / "config.json").read_text()), case)
    if not arch.residual_outputs:
        pytest.skip(f"{case}: no residual_outputs, so no DFS scales")
    recipe = path_to_recipe([Step(*s) for s in PATH], sources, arch.residual_outputs)
    evomerge(recipe, tmp_path / "exported")
    candidate = Materializer(sources).apply(recipe)
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        got, want = candidate.model(ids).logits, load_with_tiny_eps(tmp_path / "exported")(ids).logits
    assert candidate.mode == "stacked"
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    # one KV-cache slot per path position: generating with the cache equals generating without it
    prompt = {"input_ids": ids[:, :6], "attention_mask": torch.ones_like(ids[:, :6])}
    with torch.no_grad():
        cached = candidate.model.generate(**prompt, max_new_tokens=4, do_sample=False)
        uncached = candidate.model.generate(**prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


SYMMETRY_CASES = [c for c in CASES if c not in ("gpt2", "gpt_neox")]


@pytest.mark.parametrize("case", SYMMETRY_CASES)
def test_rebasin_undoes_a_hidden_permutation_of_every_kind(case: str, zoo, tmp_path: Path) -> None:
    """B = A with its KV groups, its q heads inside each group, its MLP units and its residual stream
    permuted (fused projections, q/k norms and biases move along): same function, and rebasin with
    t = 1 gives back A's tensors exactly."""
    from safetensors.torch import save_file

    from evomerge.merge.data_aware.permutation import permutation_spec, permute_state, random_permutations

    a = zoo(case)["base"]
    arch = detect_architecture(json.loads((a / "config.json").read_text()), str(a))
    assert arch.symmetry == "llama", f"{case} has no permutation symmetry in its file"
    b = tmp_path / "b"
    b.mkdir()
    (b / "config.json").write_text((a / "config.json").read_text())
    state = read_all(a)
    spec = permutation_spec(
        "llama",
        json.loads((a / "config.json").read_text()),
        {k: tuple(v.shape) for k, v in state.items()},
        residual=True,
    )
    perms = random_permutations(spec, seed=5, move_all=True)
    assert spec.nested["qheads.0"] == ("heads.0", 2)  # GQA: two q heads per KV head
    save_file(permute_state(state, spec, perms), b / "model.safetensors", metadata={"format": "pt"})
    assert not torch.equal(
        read_all(b)["model.layers.0.self_attn.o_proj.weight"], state["model.layers.0.self_attn.o_proj.weight"]
    )
    assert torch.allclose(logits(a), logits(b), atol=1e-4)
    recipe = {"merge_method": "rebasin", "base_model": str(a), "models": [{"model": str(b)}], "parameters": {"t": 1.0}}
    merged = evomerge(recipe, tmp_path / "out")
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[name], state[name]) for name in state)
    assert torch.equal(logits(tmp_path / "out"), logits(a))
