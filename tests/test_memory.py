"""Precision and memory: every cache mode gives `evomerge merge`'s bits, for fp32 and bf16 sources.

`full` keeps every cache, `budgeted` keeps what fits in the budget and streams the rest, `minimal`
keeps nothing (candidates/budget.py, stream.py). One materializer per mode serves every recipe in
sequence (as in test_materialize), with a small stream chunk so tensors span many chunks (odd
starts, DELLA rows, ties at a top-k cut across chunks). Also: the budget is checked with one line
naming the field, and mmap-backed sources share pages between two processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_materialize import SEED, assert_same_state, file_merge, ps_recipes

from evomerge.candidates.budget import ByteCache, cache_mode, parse_budget
from evomerge.candidates.fused import _topk_cut
from evomerge.candidates.materialize import Materializer, workspace_bytes
from evomerge.candidates.stream import streamed_topk_cut, uniform_range
from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import make_generator
from evomerge.merge.methods.sparsify import uniform_like

torch.set_num_threads(1)

NAMES = ("base", "add", "rev", "shift")
FUSED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear"}
CHUNK = 37  # odd: chunk starts fall on odd entries (the draws' half-step skip)


def bf16_copy(zoo: Path, out: Path) -> Path:
    """The zoo with every weight stored in bfloat16 (what real checkpoints ship)."""
    for name in NAMES:
        (out / name).mkdir(parents=True)
        for file in (zoo / name).iterdir():
            if file.name == "model.safetensors":
                tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}
                save_file(tensors, str(out / name / file.name), metadata={"format": "pt"})
            elif file.name == "config.json":
                config = json.loads(file.read_text())
                config["torch_dtype"] = config["dtype"] = "bfloat16"
                (out / name / file.name).write_text(json.dumps(config))
            else:
                (out / name / file.name).write_bytes(file.read_bytes())
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def zoo_and_merges(request, mini_zoo: Path, tmp_path_factory: pytest.TempPathFactory):
    """(zoo, recipes, label -> tensors of the file merge) for sources stored in one dtype."""
    root = tmp_path_factory.mktemp(f"memory-{request.param}")
    zoo = mini_zoo if request.param == "float32" else bf16_copy(mini_zoo, root / "zoo")
    recipes = ps_recipes(zoo)
    merges = {
        label: load_file(str(file_merge(recipe, root / label.replace("@", "-"), seed=SEED) / "model.safetensors"))
        for label, recipe in recipes.items()
    }
    return zoo, recipes, merges


def full_cache_bytes(zoo: Path, recipes: dict) -> tuple[int, int]:
    """(cache bytes a full-cache run of every recipe holds, the largest workspace reserve)."""
    materializer = Materializer([zoo / n for n in NAMES])
    workspace = 0
    for recipe in recipes.values():
        workspace = max(workspace, workspace_bytes(materializer.apply(recipe, seed=SEED).plan))
    return materializer.pool.nbytes, workspace


def half_budget(zoo: Path, recipes: dict) -> int:
    """A budget with room for about a quarter of the task vectors the full mode caches for `recipes`."""
    materializer = Materializer([zoo / n for n in NAMES])
    workspace, targets = 0, 0
    for recipe in recipes.values():
        plan = materializer.apply(recipe, seed=SEED).plan
        workspace, targets = max(workspace, workspace_bytes(plan)), max(targets, plan.total_bytes)
    return materializer.resident_bytes + 2 * targets + workspace + materializer.deltas.nbytes // 4


@pytest.mark.parametrize("mode", ["full", "budgeted", "minimal"])
def test_every_cache_mode_equals_the_file_merge_bit_for_bit(zoo_and_merges, mode: str) -> None:
    zoo, recipes, merges = zoo_and_merges
    budget = half_budget(zoo, recipes) if mode == "budgeted" else None
    materializer = Materializer([zoo / n for n in NAMES], cache=mode, memory_budget=budget)  # type: ignore[arg-type]
    materializer.stream.chunk_entries = CHUNK
    dtype = next(iter(materializer._residents.values())).tensors["model.embed_tokens.weight"].dtype
    assert dtype == (torch.bfloat16 if "bfloat16" in str(zoo) else torch.float32)  # stored dtype, resident
    for label, recipe in recipes.items():
        candidate = materializer.apply(recipe, seed=SEED)
        assert_same_state(candidate.model, merges[label], f"{mode}: {label}")
    if mode == "full":
        assert materializer.stream.jobs == 0 and len(materializer.deltas) > 0
    elif mode == "minimal":
        assert materializer.pool.nbytes == 0 and materializer.flat.candidates == 0
        assert materializer.stream.jobs > 0
    else:  # some jobs cached, the others streamed, and the budget held
        assert materializer.stream.jobs > 0 and len(materializer.deltas) > 0
        assert materializer.resident_bytes + materializer.target_bytes + materializer.pool.nbytes <= budget


@pytest.mark.parametrize("mode", ["budgeted", "minimal"])
def test_streamed_jobs_through_the_compiled_kernel_equal_the_file_merge(
    mini_zoo: Path, tmp_path: Path, mode: str
) -> None:
    recipes = ps_recipes(mini_zoo)
    labels = ["ties@bf16-inputs", "dare_ties", "della"]
    budget = half_budget(mini_zoo, {label: recipes[label] for label in labels}) if mode == "budgeted" else None
    materializer = Materializer([mini_zoo / n for n in NAMES], kernels="compiled", cache=mode, memory_budget=budget)  # type: ignore[arg-type]
    materializer.stream.chunk_entries = CHUNK
    for label in labels:
        candidate = materializer.apply(recipes[label], seed=SEED)
        written = load_file(
            str(file_merge(recipes[label], tmp_path / label.replace("@", "-"), seed=SEED) / "model.safetensors")
        )
        assert_same_state(candidate.model, written, f"{mode}: {label}")
    assert materializer.stream.jobs > 0 and not materializer.fused.disabled
    assert (materializer.fused.fused_jobs > 0) == (mode == "budgeted")


def test_without_a_compiler_streamed_jobs_run_eager_with_the_same_bits(
    zoo_and_merges, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo, recipes, merges = zoo_and_merges

    def no_compiler(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    materializer = Materializer([zoo / n for n in NAMES], kernels="compiled", cache="minimal")
    for label in ("ties", "dare_ties"):
        assert_same_state(materializer.apply(recipes[label], seed=SEED).model, merges[label], label)
    assert materializer.fused.disabled and materializer.stream.jobs > 0


def test_many_ties_at_the_cut_are_kept_by_index_with_the_same_bits(
    zoo_and_merges, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 task vectors tie by the million at a top-k cut; the cached kernel then compares flat
    indices instead of patching the tied entries (forced here on the mini zoo's small tensors)."""
    import evomerge.candidates.fused as fused_module

    zoo, recipes, merges = zoo_and_merges
    monkeypatch.setattr(fused_module, "TIE_PATCH_MAX", 0)
    materializer = Materializer([zoo / n for n in NAMES], kernels="compiled")
    for label in ("ties", "ties@bf16-inputs"):
        assert_same_state(materializer.apply(recipes[label], seed=SEED).model, merges[label], label)
    assert materializer.fused.index_jobs > 0 and materializer.fused.eager_jobs == 0


def test_a_budget_below_sources_plus_one_candidate_is_one_line_naming_the_field(mini_zoo: Path) -> None:
    sources = [mini_zoo / n for n in NAMES]
    resident = Materializer(sources).resident_bytes
    with pytest.raises(EvomergeError, match=r"^memory_budget: .* cannot hold the sources .* plus one candidate") as e:
        Materializer(sources, memory_budget=resident)
    assert "\n" not in str(e.value)
    with pytest.raises(EvomergeError, match="^memory_budget: cannot parse"):
        parse_budget("lots")
    with pytest.raises(EvomergeError, match="^cache: 'none' is not one of full, budgeted, minimal"):
        cache_mode("none", None)
    with pytest.raises(EvomergeError, match="^cache: budgeted needs memory_budget"):
        cache_mode("budgeted", None)
    assert parse_budget("40GB") == 40 * 10**9 and cache_mode(None, 1) == "budgeted"


def test_a_search_space_names_a_bad_worker_budget() -> None:
    import yaml

    from evomerge.io.paths import REPO_ROOT
    from evomerge.search.space.config import parse_space

    space = yaml.safe_load((REPO_ROOT / "search_spaces" / "toy_ps.yaml").read_text())
    for kwargs, message in (
        ({"memory_budget": "forty"}, "^worker.kwargs: memory_budget: cannot parse 'forty'"),
        ({"cache": "most"}, "^worker.kwargs: cache: 'most' is not one of full, budgeted, minimal"),
    ):
        with pytest.raises(EvomergeError, match=message) as e:
            parse_space({**space, "worker": {"kwargs": kwargs}})
        assert "\n" not in str(e.value)
    config = parse_space({**space, "worker": {"kwargs": {"memory_budget": "40GB", "cache": "budgeted"}}})
    assert config.worker.kwargs["memory_budget"] == "40GB"


# a large tensor is read in large chunks only: one-entry chunks of it are slow and add nothing
SHAPES = [(37 * 29, step) for step in (1, 7, 64, 10_000)] + [(300_001, 10_000)]


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("entries,step", SHAPES)
def test_the_streamed_topk_cut_equals_the_sorted_one_with_many_ties(entries: int, step: int, density: float) -> None:
    """The radix selection gives the sorted cut (value and first kept tied index), with ties at
    every cut (few magnitudes) and without (a continuous distribution)."""
    generator = torch.Generator().manual_seed(entries)
    for delta in (
        torch.randint(-4, 5, (entries,), generator=generator).float() / 8,  # nine magnitudes
        torch.randn(entries, generator=generator),
    ):
        values, order = delta.abs().sort(stable=True)
        expected = _topk_cut(values, order.to(torch.int32), density)
        found = streamed_topk_cut(lambda a, b: delta[a:b].abs(), delta.numel(), density, step)  # noqa: B023
        assert (found.value, found.start) == (expected.value, expected.start)
        assert found.tied is None


def test_uniform_range_is_the_slice_of_the_generators_draws() -> None:
    generator = make_generator(11, 1, "model.layers.0.mlp.up_proj.weight")
    full = uniform_like(torch.empty(1001), generator)
    for start, stop in ((0, 1001), (1, 8), (2, 500), (37, 74), (999, 1001)):
        assert torch.equal(uniform_range(generator, start, stop), full[start:stop]), (start, stop)


def test_the_byte_cache_keeps_what_it_admitted_across_a_cyclic_scan() -> None:
    """A budget holding two of three entries serves two of three lookups per pass (an LRU: none)."""
    cache = ByteCache(max_bytes=200)
    hits = 0
    for _ in range(4):
        cache.tick()
        for key in ("a", "b", "c"):
            if cache.get(("delta", key)) is not None:
                hits += 1
            else:
                cache.put(("delta", key), key, 100)
    assert hits == 6 and cache.nbytes == 200
    cache.resize(100)
    assert cache.nbytes == 100


SHARE_PROBE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from evomerge.candidates.materialize import Materializer

    def pss():
        fields = {}
        for line in open("/proc/self/smaps_rollup"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
        return fields["Pss"]

    before = pss()
    m = Materializer(sys.argv[1].split(","), mmap=sys.argv[2] == "1")
    total = sum(float(t.float().sum()) for r in m._residents.values() for t in r.tensors.values())  # touch all
    Path(sys.argv[3]).touch()
    while not Path(sys.argv[4]).exists():  # both processes hold their sources
        time.sleep(0.05)
    print(pss() - before, m.resident_bytes, flush=True)
    """
)


def shared_pss(tmp_path: Path, sources: list[Path], mmap: bool) -> tuple[int, int]:
    """(summed PSS growth of two processes holding the same sources, the sources' bytes)."""
    import os

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    ready = [tmp_path / f"ready{mmap}{i}" for i in range(2)]
    go = tmp_path / f"go{mmap}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARE_PROBE, ",".join(map(str, sources)), str(int(mmap)), str(r), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in ready
    ]
    import time

    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # both have touched their pages: measure while both map them
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    values = [tuple(map(int, o[0].split())) for o in outs]
    return sum(v[0] for v in values), values[0][1]


def test_mmap_sources_share_pages_between_two_workers(tmp_path: Path) -> None:
    """Two processes holding the same ~100 MB of sources: mapped, their summed PSS growth stays
    well below twice the sources (each page counts half in each); copied, it is about twice."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
    )
    sources = []
    for seed in range(3):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}"
        LlamaForCausalLM(config).save_pretrained(path)
        sources.append(path)
    mapped, nbytes = shared_pss(tmp_path, sources, mmap=True)
    copied, _ = shared_pss(tmp_path, sources, mmap=False)
    assert nbytes > 80e6
    assert mapped < 1.4 * nbytes, (mapped, nbytes)
    assert copied > 1.8 * nbytes, (copied, nbytes)
