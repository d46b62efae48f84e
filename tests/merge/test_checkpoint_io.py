"""Reading and writing model directories: sharding, atomicity, configs, tokenizers, architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama, write_tokenizer
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import CheckpointReader, TensorEntry, parse_size, shard_layout
from evomerge.merge.recipe import load_recipe
from evomerge.merge.runner import RECIPE_FILE, merge_from_file


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def merge(tmp_path: Path, text: str, out_name: str = "out", **kw) -> Path:
    recipe = tmp_path / f"{out_name}.yml"
    recipe.write_text(text)
    out = tmp_path / out_name
    merge_from_file(recipe, out, progress=False, **kw)
    return out


def identity_recipe(model: Path) -> str:
    return f"merge_method: passthrough\nmodels: [{{model: {model}}}]\n"


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert parse_size("1234") == 1234
    with pytest.raises(EvomergeError, match="--max-shard-size"):
        parse_size("two gigs")


def test_shard_layout_packs_in_order():
    entries = [TensorEntry(f"t{i}", (10,), torch.float32) for i in range(5)]  # 40 bytes each
    layout = shard_layout(entries, 100)
    assert [[e.name for e in shard] for shard in layout] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [len(s) for s in shard_layout(entries, 10)] == [1, 1, 1, 1, 1]  # oversized tensors alone


def test_reads_sharded_checkpoint_and_writes_sharded_output(tmp_path, llama_zoo):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded_in"
    AutoModelForCausalLM.from_pretrained(llama_zoo["ft1"]).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    reader = CheckpointReader(sharded)
    original = load_file(str(llama_zoo["ft1"] / "model.safetensors"))
    assert set(reader.names()) == set(original)
    assert torch.equal(reader.get("model.layers.3.mlp.up_proj.weight"), original["model.layers.3.mlp.up_proj.weight"])

    out = merge(tmp_path, identity_recipe(sharded), max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        tensors = load_file(str(shard))
        assert shard.stat().st_size <= 30_000 + 4096 or len(tensors) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    merged = read_all(out)
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3]])
    reference = AutoModelForCausalLM.from_pretrained(llama_zoo["ft1"])
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_output_directory_contents(tmp_path, llama_zoo):
    text = f"""
merge_method: dare_ties
base_model: {llama_zoo["base"]}
models:
  - model: {llama_zoo["ft1"]}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {llama_zoo["ft2"]}
    parameters: {{weight: 0.4, density: 0.5}}
"""
    out = merge(tmp_path, text, seed=11)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", RECIPE_FILE} <= names
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "base"  # the donor's files
    written = load_recipe(out / RECIPE_FILE)
    assert written.seed == 11 and written.merge_method == "dare_ties"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # tokenizer_source builds the output vocabulary from the tokenizers (as mergekit does), so
    # tokenizer files that do not load are one error line naming the field, and nothing is written
    with pytest.raises(EvomergeError, match=r"^tokenizer_source: cannot load the tokenizer of .*base"):
        merge(tmp_path, text + f"tokenizer_source: {llama_zoo['ft2']}\n", "out2")
    assert not (tmp_path / "out2").exists()


class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_merge_leaves_nothing(tmp_path, llama_zoo, monkeypatch):
    from evomerge.merge.methods import task_arithmetic

    calls = {"n": 0}
    real = task_arithmetic.generalized_task_arithmetic

    def flaky(call, sparsifier, consensus):
        calls["n"] += 1
        if calls["n"] == 12:
            raise _Interrupt()
        return real(call, sparsifier, consensus)

    monkeypatch.setattr(task_arithmetic, "generalized_task_arithmetic", flaky)
    text = f"""
merge_method: ties
base_model: {llama_zoo["base"]}
models: [{{model: {llama_zoo["ft1"]}, parameters: {{weight: 1, density: 0.3}}}}]
"""
    with pytest.raises(_Interrupt):
        merge(tmp_path, text, max_shard_size="20KB")
    assert calls["n"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yml"]

    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    calls["n"] = 0
    with pytest.raises(_Interrupt):
        merge(tmp_path, text, overwrite=True)
    assert sorted(p.name for p in previous.iterdir()) == ["config.json"]  # old output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.yml"]


def test_layer_stack_config_and_weights(tmp_path, llama_zoo):
    from transformers import AutoModelForCausalLM

    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {llama_zoo["ft1"]}, layer_range: [0, 3]}}]
  - sources:
      - model: {llama_zoo["ft2"]}
        layer_range: [1, 4]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]
dtype: bfloat16
"""
    out = merge(tmp_path, text)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["dtype"] == "bfloat16"
    merged = read_all(out)
    ft1 = load_file(str(llama_zoo["ft1"] / "model.safetensors"))
    ft2 = load_file(str(llama_zoo["ft2"] / "model.safetensors"))
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], ft1["model.layers.2.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], ft2["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(
        merged["model.layers.5.self_attn.o_proj.weight"],
        (ft2["model.layers.3.self_attn.o_proj.weight"].bfloat16().float() * 0.5).bfloat16(),
    )
    assert torch.equal(merged["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(merged["lm_head.weight"], ft2["lm_head.weight"].bfloat16())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_gpt2_and_tied_embeddings(tmp_path, gpt2_zoo):
    from transformers import AutoModelForCausalLM

    text = f"""
merge_method: ties
base_model: {gpt2_zoo["base"]}
models:
  - model: {gpt2_zoo["ft1"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {gpt2_zoo["ft2"]}
    parameters: {{weight: 1.0, density: 0.5}}
"""
    out = merge(tmp_path, text)
    merged = read_all(out)
    assert "lm_head.weight" not in merged and "transformer.wte.weight" in merged
    assert json.loads((out / "config.json").read_text())["n_layer"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])


def test_tied_and_untied_llama_mix(tmp_path, llama_zoo):
    tied = make_llama(tmp_path / "tied", 5, base=llama_zoo["base"], tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    text = f"""
merge_method: linear
models:
  - model: {tied}
    parameters: {{weight: 1.0}}
  - model: {llama_zoo["ft1"]}
    parameters: {{weight: 1.0}}
"""
    out = merge(tmp_path, text)
    merged = read_all(out)
    tied_state = load_file(str(tied / "model.safetensors"))
    ft1 = load_file(str(llama_zoo["ft1"] / "model.safetensors"))
    # the tied model contributes its embedding matrix as its lm_head
    expected = (tied_state["model.embed_tokens.weight"] + ft1["lm_head.weight"]) / 2
    torch.testing.assert_close(merged["lm_head.weight"], expected, atol=1e-7, rtol=0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    only_tied = merge(tmp_path, f"merge_method: passthrough\nmodels: [{{model: {tied}}}]\n", "out2")
    assert "lm_head.weight" not in read_all(only_tied)
    assert json.loads((only_tied / "config.json").read_text())["tie_word_embeddings"] is True


def test_unsupported_architecture_and_vocab_mismatch(tmp_path, llama_zoo):
    other = make_llama(tmp_path / "vocab", 3, vocab_size=100)
    write_tokenizer(other)
    text = f"""
merge_method: task_arithmetic
base_model: {llama_zoo["base"]}
models: [{{model: {other}, parameters: {{weight: 1}}}}]
"""
    with pytest.raises(EvomergeError, match="vocabulary sizes differ"):
        merge(tmp_path, text)
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(EvomergeError, match="unsupported architecture BertModel"):
        merge(tmp_path, identity_recipe(weird), "out3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out3").exists()


def test_shared_source_tensor_is_not_overwritten_between_jobs(tmp_path, llama_zoo):
    """A tied model's embedding feeds both the embedding job and the lm_head job; the first job
    must not change what the second reads (safetensors hands out views of one mapping)."""
    tied = make_llama(tmp_path / "tied2", 6, base=llama_zoo["base"], tie_word_embeddings=True)
    text = f"""
merge_method: task_arithmetic
base_model: {llama_zoo["ft1"]}
models: [{{model: {tied}, parameters: {{weight: 0.5}}}}]
"""
    merged = read_all(merge(tmp_path, text))
    embed = load_file(str(tied / "model.safetensors"))["model.embed_tokens.weight"]
    ft1 = load_file(str(llama_zoo["ft1"] / "model.safetensors"))
    for name, base in (
        ("model.embed_tokens.weight", ft1["model.embed_tokens.weight"]),
        ("lm_head.weight", ft1["lm_head.weight"]),
    ):
        torch.testing.assert_close(merged[name], base + 0.5 * (embed - base), atol=1e-6, rtol=0)


def test_resident_sources_are_never_modified(llama_zoo):
    """A source that hands out the same tensors every time (as a search worker's resident store
    does) must give identical results on repeated merges."""
    from evomerge.merge.jobs import ModelCatalog
    from evomerge.merge.plan import plan_merge
    from evomerge.merge.recipe import loads_recipe
    from evomerge.merge.runner import CheckpointSource, compute_tensor

    recipe = loads_recipe(f"""
merge_method: ties
base_model: {llama_zoo["base"]}
models:
  - {{model: {llama_zoo["ft1"]}, parameters: {{weight: 0.7, density: 0.4}}}}
  - {{model: {llama_zoo["ft2"]}, parameters: {{weight: 1.0, density: 0.8}}}}
dtype: float32
""")
    plan = plan_merge(recipe, ModelCatalog())
    files = CheckpointSource(plan)
    resident: dict = {}

    class Resident:
        def get(self, ref):
            return resident.setdefault((ref.model, ref.name), files.get(ref))

    first = {job.name: compute_tensor(plan, job, Resident()) for job in plan.jobs}
    second = {job.name: compute_tensor(plan, job, Resident()) for job in plan.jobs}
    from_files = {job.name: compute_tensor(plan, job, files) for job in plan.jobs}
    assert all(torch.equal(first[n], second[n]) and torch.equal(first[n], from_files[n]) for n in first)


def test_sigterm_leaves_no_partial_output(tmp_path, llama_zoo):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = tmp_path / "slow.yml"
    recipe.write_text(f"""
merge_method: dare_ties
base_model: {llama_zoo["base"]}
models: [{{model: {llama_zoo["ft1"]}, parameters: {{weight: 1, density: 0.5}}}}]
""")
    code = (
        "import time, evomerge.merge.runner as m\n"
        "real = m.compute_tensor\n"
        "def slow(*a, **k):\n    time.sleep(0.2)\n    return real(*a, **k)\n"
        "m.compute_tensor = slow\n"
        f"m.merge_from_file({str(recipe)!r}, {str(tmp_path / 'out')!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.yml"]


def test_the_next_merge_removes_what_a_killed_merge_left(tmp_path, llama_zoo):
    """SIGKILL gives no chance to clean up: the hidden partial directory of the dead process is
    removed by the next merge into the same OUT_DIR; one of a live process is left alone."""
    import os
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    orphan = tmp_path / f".out.partial-{int(dead.stdout)}-deadbeef"
    live = tmp_path / f".out.partial-{os.getpid()}-cafecafe"
    for folder in (orphan, live):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    merge(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {llama_zoo["base"]}
models: [{{model: {llama_zoo["ft1"]}, parameters: {{weight: 1}}}}]
""",
    )
    assert not orphan.exists() and live.exists()
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della_linear", "breadcrumbs_ties"])
def test_bf16_inputs_match_fp32_math(tmp_path, llama_zoo, method):
    """Low-precision inputs enter the task-vector math upcast exactly, whatever path loads them."""
    from evomerge.merge.jobs import ModelCatalog
    from evomerge.merge.methods import MethodCall, get_method
    from evomerge.merge.plan import plan_merge
    from evomerge.merge.recipe import loads_recipe

    models = {
        n: make_llama(tmp_path / n, 20 + i, base=llama_zoo["base"], dtype=torch.bfloat16)
        for i, n in enumerate(["b0", "b1", "b2"])
    }
    text = f"""
merge_method: {method}
base_model: {models["b0"]}
models:
  - {{model: {models["b1"]}, parameters: {{weight: 0.7, density: 0.4}}}}
  - {{model: {models["b2"]}, parameters: {{weight: 0.5, density: 0.6}}}}
"""
    merged = read_all(merge(tmp_path, text, seed=4))
    plan = plan_merge(loads_recipe(text), ModelCatalog(), seed=4)
    states = [load_file(str(m.path / "model.safetensors")) for m in plan.models]
    for job in plan.jobs[::7]:
        call = MethodCall(
            job.name,
            states[job.base.model][job.base.name].float(),
            [states[r.model][r.name].float() for r in job.inputs],
            job.input_params,
            job.params,
            plan.generators(job),
        )
        expected = get_method(method).fn(call).to(torch.bfloat16)
        assert merged[job.name].dtype == torch.bfloat16
        assert torch.equal(merged[job.name], expected), job.name
