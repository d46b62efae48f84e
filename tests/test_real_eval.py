"""Evaluation on real tokenizers (issue #15, part 3): tiny Llama / Qwen2 / Gemma2 / Phi3 models with
a byte-level BPE, a Metaspace + Unigram and a Metaspace + byte-fallback BPE tokenizer, trained here
on the fly (tests/real_models.py), scored on local lm-eval tasks of both kinds (generate_until with
exact match, multiple-choice loglikelihood with acc), zero-shot and 2-shot, with and without a chat
template. Everything is compared item by item with lm-eval's own `HFLM`:

- the lean greedy decode answers every request exactly as HFLM's HF `generate` (task prompts, chat
  prompts, stop strings that fall inside multi-character tokens, stops of several tokens, EOS only,
  EOS lists, pad = EOS, left-truncated prompts, batches that pad differently), and steps aside for
  a candidate whose generation config it cannot follow;
- `evomerge eval`'s scoring path (our task loading, request/result caches, prompt options) logs
  the same prompts, responses and metrics per doc as `lm_eval.simple_evaluate(model="hf", ...)` on
  the same model directory, bf16 included;
- the search's prompt options reach the worker's requests, and each candidate is scored with the
  tokenizer its recipe names;
- search -> export -> `evomerge merge` -> HFLM (the `lm_eval` command line in the slow matrix) gives
  the test score summary.json reports, and the in-memory final candidate answers every test doc as
  HFLM does on the exported directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import real_models as rm
import torch
import yaml
from lm_eval.api.instance import Instance

from evomerge.errors import EvomergeError
from evomerge.io.model_loading import load_model_and_tokenizer
from evomerge.scoring.lm_tasks import PromptOptions, load_tasks, make_lm, metric_values, score_tasks

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

CHAT = PromptOptions(apply_chat_template=True, system_instruction="Answer with one word.")
# the Gemma-style template refuses the system turn: lm-eval retries without it (both sides must)
CHAT_SINGLE_TURN = PromptOptions(apply_chat_template=True, fewshot_as_multiturn=False, system_instruction="Be brief.")
TASKS = [rm.GEN_TASK, rm.MC_TASK, rm.GEN_FEWSHOT_TASK, rm.MC_FEWSHOT_TASK]
MARKERS = {"bpe": "<|im_start|>", "sentencepiece": "<start_of_turn>", "sentencepiece_bpe": "[INST]"}
SCORED_FAMILY = {"bpe": "gemma2", "sentencepiece": "llama", "sentencepiece_bpe": "phi3"}  # one per tokenizer


class World:
    """Task folder, tokenizers and trained model families, built on first use and kept for the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tasks = rm.write_tasks(root / "tasks")
        self._tokenizers: dict[str, Path] = {}
        self._families: dict[tuple[str, str], dict[str, Path]] = {}

    def tokenizer(self, kind: str) -> Path:
        if kind not in self._tokenizers:
            self._tokenizers[kind] = rm.build_tokenizer(kind, self.root / f"tok-{kind}")
        return self._tokenizers[kind]

    def family(self, kind: str, family: str) -> dict[str, Path]:
        key = (kind, family)
        if key not in self._families:
            self._families[key] = rm.train_family(family, self.tokenizer(kind), self.root / f"{kind}-{family}", 150)
        return self._families[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("real"))


# -- the lean decode against HFLM's generate ------------------------------------------------------


def generation_requests(world: World, lm: Any, kind: str) -> list[Instance]:
    """What lm-eval builds for the generate tasks (validation split, zero- and 2-shot, plain and with
    the chat template and a system instruction), plus the same prompts under other stop strings and
    budgets, and prompts longer than the model's context (left-truncated)."""
    loaded = load_tasks([rm.GEN_TASK, rm.GEN_FEWSHOT_TASK], split="validation", include_paths=[world.tasks])
    built: list[Instance] = []
    for options in (PromptOptions(), CHAT):
        kwargs = options.evaluate_kwargs()
        for task in loaded.task_dict["tasks"].values():
            task.build_all_requests(
                rank=0,
                world_size=1,
                apply_chat_template=bool(kwargs["apply_chat_template"]),
                fewshot_as_multiturn=kwargs["fewshot_as_multiturn"],
                system_instruction=kwargs["system_instruction"],
                chat_template=lm.apply_chat_template if kwargs["apply_chat_template"] else None,
            )
            built += task.instances
    assert sum(MARKERS[kind] in r.args[0] for r in built) == len(built) // 2  # the chat half is templated
    others = [
        {"until": ["pp"], "max_gen_toks": 9},  # inside a word: a stop within a multi-character token
        {"until": ["\n\n", "e"], "max_gen_toks": 12},
        {"until": ["opposite of"], "max_gen_toks": 16},  # a stop string of several tokens
        {"max_gen_toks": 10},  # EOS only
        {"until": ["Q:"], "max_gen_toks": 7, "temperature": 0.0},
    ]
    variants = [
        Instance("generate_until", r.doc, (r.args[0], copy.deepcopy(others[i % len(others)])), i)
        for i, r in enumerate(built)
    ]
    long = [
        Instance("generate_until", r.doc, (r.args[0] * 60, {"until": ["\n"], "max_gen_toks": 5}), 0) for r in built[:3]
    ]
    return built + variants + long


DEFAULT_PAIRS = set(SCORED_FAMILY.items())  # the rest: -m slow
LEAN_CASES = [
    pytest.param(kind, family, id=f"{kind}-{family}", marks=() if (kind, family) in DEFAULT_PAIRS else pytest.mark.slow)
    for kind, family in rm.PAIRS_OK
]


@pytest.mark.parametrize(("kind", "family"), LEAN_CASES)
def test_lean_generation_equals_hflm_item_by_item(world: World, kind: str, family: str) -> None:
    """Also with a generation config whose EOS ids are a list holding the newline token (rows end
    at different steps and are padded after it) and a tokenizer whose pad token is its EOS (GPT-2
    and Qwen2 checkpoints ship it so)."""
    model, tokenizer = load_model_and_tokenizer(world.family(kind, family)["base"])
    requests = generation_requests(world, make_lm(model, tokenizer), kind)
    assert max(len(tokenizer(r.args[0])["input_ids"]) for r in requests) > model.config.max_position_embeddings
    newline = tokenizer.encode("A:\n", add_special_tokens=False)[-1]
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    for setting in ("as saved", "eos list, pad is eos"):
        if setting != "as saved":
            model.generation_config = copy.deepcopy(model.generation_config)
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, newline]
            tokenizer = pad_is_eos
        for batch_size in (5, 64):
            lean = make_lm(model, tokenizer, batch_size=batch_size, lean=True)
            plain = make_lm(model, tokenizer, batch_size=batch_size, lean=False)
            expected = plain.generate_until(requests)
            got = lean.generate_until(requests)
            assert lean.lean_calls == 1 and plain.lean_calls == 0  # the lean path ran, HFLM's generate did not
            mismatches = [(r.args, a, b) for r, a, b in zip(requests, expected, got, strict=True) if a != b]
            assert not mismatches, (setting, mismatches[:3])
            assert len(set(expected)) > 5  # the outputs vary: a comparison of constant strings proves little


# -- evomerge's scoring path against lm_eval.simple_evaluate(model="hf") --------------------------


def hflm_results(model_dir: Path, tasks_dir: Path, names: list[str], options: PromptOptions, monkeypatch) -> dict:
    """lm-eval's own run on a model directory, as `lm_eval --model hf --tasks ... --batch_size 64
    --include_path TASKS [chat options]` does it (from the task folder: lm-eval resolves data files
    against the working directory)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tasks_dir)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "device": "cpu"},
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        batch_size=64,
        log_samples=True,
        bootstrap_iters=0,
        **options.evaluate_kwargs(),
    )


def hflm_cli_results(model_dir: Path, tasks_dir: Path, names: list[str], options: PromptOptions, out: Path) -> dict:
    """The same through the `lm_eval` command line (`python -m lm_eval --model hf ...`), read back
    from its results and per-task samples files into `simple_evaluate`'s shape."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}"]
    command += ["--device", "cpu", "--tasks", ",".join(names), "--include_path", str(tasks_dir)]
    command += ["--batch_size", "64", "--log_samples", "--output_path", str(out)]
    if options.apply_chat_template:
        command.append("--apply_chat_template")
    if options.fewshot_as_multiturn is not None:
        command += ["--fewshot_as_multiturn", str(options.fewshot_as_multiturn).lower()]
    if options.system_instruction is not None:
        command += ["--system_instruction", options.system_instruction]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tasks_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    samples = {
        name: [json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
        for name in names
    }
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


def _plain(value: Any) -> Any:
    """As JSON has it (tuples become lists): lm-eval's samples files and its in-process results alike."""
    return json.loads(json.dumps(value, default=str))


def _as_text(value: Any) -> Any:
    """Every leaf as `str` (lists kept): the samples file writes responses as strings, and `str` of
    a float is its shortest exact repr, so comparing texts still compares the values exactly."""
    if isinstance(value, (list, tuple)):
        return [_as_text(v) for v in value]
    return str(value)


def _arguments(sample: dict) -> Any:
    """The request arguments of a sample; the samples file writes them as {gen_args_i: {arg_j: ...}}."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        arguments = [list(group.values()) for group in arguments.values()]
    return _plain(arguments)


def per_doc(results: dict, task: str) -> list[tuple[Any, ...]]:
    """Per doc: its id, the prompts and targets sent to the model, the raw and filtered responses
    and the doc's metric values."""
    rows = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        metrics = {k: sample[k] for k in ("exact_match", "acc", "acc_norm") if k in sample}
        responses = _as_text([sample["resps"], sample["filtered_resps"]])
        rows.append((sample["doc_id"], _arguments(sample), responses, metrics))
    return rows


def assert_same_per_doc(ours: dict, theirs: dict, names: list[str]) -> None:
    for name in names:
        mine, reference = per_doc(ours, name), per_doc(theirs, name)
        assert len(mine) == len(reference) == 12
        different = [(a, b) for a, b in zip(mine, reference, strict=True) if a != b]
        assert not different, different[:2]
    assert metric_values(ours) == {k: v for k, v in metric_values(theirs).items() if k in names}


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("bpe", PromptOptions()),
        ("bpe", CHAT),
        ("sentencepiece", PromptOptions()),
        ("sentencepiece", CHAT_SINGLE_TURN),
        ("sentencepiece_bpe", CHAT),
    ],
    ids=["bpe-plain", "bpe-chat", "sentencepiece-plain", "sentencepiece-chat-single-turn", "sentencepiece_bpe-chat"],
)
def test_scoring_equals_lm_eval_hf_per_doc(world: World, kind: str, options: PromptOptions, monkeypatch) -> None:
    model_dir = world.family(kind, SCORED_FAMILY[kind])["ft1"]
    model, tokenizer = load_model_and_tokenizer(model_dir)
    loaded = load_tasks(TASKS, split="test", include_paths=[world.tasks])
    lm = make_lm(model, tokenizer, batch_size=64)
    # a subset first (as a search scores its items): the full run must not depend on what came before
    score_tasks(lm, loaded, samples=dict.fromkeys(TASKS, [3, 5, 8]), prompts=options)
    ours = score_tasks(lm, loaded, log_samples=True, prompts=options)
    again = score_tasks(lm, loaded, log_samples=True, prompts=options)  # from the request and prompt caches
    theirs = hflm_results(model_dir, world.tasks, TASKS, options, monkeypatch)
    assert_same_per_doc(ours, theirs, TASKS)
    assert_same_per_doc(again, theirs, TASKS)
    prompts = [s["arguments"] for s in ours["samples"][rm.GEN_FEWSHOT_TASK]]
    templated = all(MARKERS[kind] in str(p) for p in prompts)
    assert templated == bool(options.apply_chat_template)
    if options.apply_chat_template and kind != "sentencepiece":  # few-shot examples as turns: 3 user turns each
        assert all(str(p).count("<|im_start|>user" if kind == "bpe" else "[INST]") == 3 for p in prompts)
        assert all("Answer with one word." in str(p) for p in prompts)
    if options.system_instruction and kind == "sentencepiece":  # refused by the template, dropped by lm-eval
        assert not any(options.system_instruction in str(p) for p in prompts)
    assert lm.lean_calls > 0


def test_eval_command_scores_a_bf16_directory_as_lm_eval_hf(world: World, tmp_path: Path, monkeypatch) -> None:
    """`evomerge eval` loads a model in the dtype it was saved in, as `lm_eval --model hf` does
    (`dtype=auto`); upcast to float32 its loglikelihoods would differ from lm-eval's."""
    import json as json_module

    from typer.testing import CliRunner

    from evomerge.cli.app import app
    from evomerge.cli.evaluate import score_model_dir

    tokenizer_dir = world.tokenizer("sentencepiece")
    model, _ = load_model_and_tokenizer(world.family("sentencepiece", "llama")["ft2"])
    bf16 = rm.save(model, tokenizer_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    names = [rm.MC_TASK, rm.GEN_FEWSHOT_TASK]
    ours = score_model_dir(bf16, names, include_paths=[world.tasks], log_samples=True, prompts=CHAT)
    theirs = hflm_results(bf16, world.tasks, names, CHAT, monkeypatch)
    assert_same_per_doc(ours, theirs, names)
    upcast, tokenizer = load_model_and_tokenizer(bf16)  # float32, the function's default
    assert upcast.dtype == torch.float32
    loaded = load_tasks(names, split="test", include_paths=[world.tasks])
    as_fp32 = score_tasks(make_lm(upcast, tokenizer), loaded, log_samples=True, prompts=CHAT)
    assert per_doc(as_fp32, rm.MC_TASK) != per_doc(theirs, rm.MC_TASK)  # the comparison can tell dtypes apart

    command = ["eval", str(bf16), "--tasks", ",".join(names), "--include-path", str(world.tasks), "--json"]
    result = CliRunner().invoke(
        app, [*command, "--apply-chat-template", "--system-instruction", CHAT.system_instruction]
    )
    assert result.exit_code == 0, result.output
    report = json_module.loads(result.output[result.output.index("{") :])
    assert report["metrics"] == metric_values(theirs)
    result = CliRunner().invoke(app, [*command, "--fewshot-as-multiturn"])
    assert result.exit_code != 0
    assert "--fewshot-as-multiturn: needs --apply-chat-template" in result.output


def test_prompt_options_are_checked_as_lm_eval_checks_them() -> None:
    with pytest.raises(ValueError, match="fewshot_as_multiturn: needs apply_chat_template"):
        PromptOptions(fewshot_as_multiturn=True)
    assert CHAT.evaluate_kwargs()["fewshot_as_multiturn"] is True  # lm_eval's CLI default with a template
    assert PromptOptions().evaluate_kwargs() == {
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
        "system_instruction": None,
    }


# -- search -> export -> lm_eval --model hf --------------------------------------------------------


def write_space(world: World, models: dict[str, Path], path: Path, prompts: PromptOptions | None) -> Path:
    space: dict[str, Any] = {
        "models": [str(models["ft1"]), str(models["ft2"])],
        "base_model": str(models["base"]),
        "tasks": [
            {"name": rm.GEN_TASK, "metric": "exact_match", "weight": 0.5},
            {"name": rm.MC_TASK, "metric": "acc", "weight": 0.5},
        ],
        "include_paths": [str(world.tasks)],
        "budget": {"max_evals": 4, "popsize": 2, "select_top_k": 2},
        "seed": 1,
        "optimizer": "random",
        "worker": {"kwargs": {"batch_size": 64}},
        "ps": {"method": "ties", "granularity": "whole", "genes": {"weight": [0.2, 1.0], "density": [0.3, 1.0]}},
    }
    if prompts is not None:
        space["prompts"] = prompts.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(space), encoding="utf-8")
    return path


def search_export_and_compare(
    world: World, kind: str, family: str, tmp_path: Path, monkeypatch, prompts=None, cli: bool = False
) -> dict:
    from evomerge.candidates.materialize import Materializer
    from evomerge.cli.search import run_export, run_search
    from evomerge.merge.recipe import load_recipe, recipe_to_dict

    models = world.family(kind, family)
    space = write_space(world, models, tmp_path / "space.yaml", prompts)
    run_dir, merged = tmp_path / "run", tmp_path / "merged"
    summary = run_search(space, run_dir, workers=1, ray_address=None, max_evals=None, seed=None, echo=lambda *_: None)
    records = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    run_export(run_dir, tmp_path / "recipe.yaml", merge_dir=merged, echo=lambda *_: None)

    names = [rm.GEN_TASK, rm.MC_TASK]
    options = prompts or PromptOptions()
    if cli:
        theirs = hflm_cli_results(merged, world.tasks, names, options, tmp_path / "lm_eval_out")
    else:
        theirs = hflm_results(merged, world.tasks, names, options, monkeypatch)
    reported = summary["final"]["test"]
    metrics = metric_values(theirs)
    assert reported["metrics"][f"{rm.GEN_TASK}/exact_match"] == metrics[rm.GEN_TASK]["exact_match"]
    assert reported["metrics"][f"{rm.MC_TASK}/acc"] == metrics[rm.MC_TASK]["acc"]
    assert reported["score"] == 0.5 * metrics[rm.GEN_TASK]["exact_match"] + 0.5 * metrics[rm.MC_TASK]["acc"]
    # per doc: the final recipe built in memory, as the worker built it, answers as HFLM on the export
    built = Materializer([str(models[n]) for n in ("base", "ft1", "ft2")]).apply(
        recipe_to_dict(load_recipe(run_dir / "final.yaml"))
    )
    loaded = load_tasks(names, split="test", include_paths=[world.tasks])
    lm = make_lm(built.model, rm.load_tokenizer(built.tokenizer_path), batch_size=64)
    assert_same_per_doc(score_tasks(lm, loaded, log_samples=True, prompts=options), theirs, names)
    return summary


def test_search_export_lm_eval_hf_gives_the_reported_test_score(world: World, tmp_path: Path, monkeypatch) -> None:
    """One family in the default suite (Gemma2: sliding-window layers, logit soft-capping), with the
    chat template and a system instruction passed from the space; in process (`simple_evaluate`)."""
    search_export_and_compare(world, "bpe", "gemma2", tmp_path, monkeypatch, prompts=CHAT)


SEARCH_CASES = [(kind, family, chat) for family in rm.FAMILIES for chat in (False, True) for kind in ["bpe"]] + [
    ("sentencepiece", "phi3", True),  # the exported chat_template.jinja (BPE keeps it in tokenizer_config.json)
    ("sentencepiece_bpe", "gemma2", True),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "family", "chat"), SEARCH_CASES, ids=[f"{k}-{f}-{'chat' if c else 'plain'}" for k, f, c in SEARCH_CASES]
)
def test_search_export_lm_eval_cli_per_family(
    world: World, kind: str, family: str, chat: bool, tmp_path: Path, monkeypatch
) -> None:
    """Every family with the BPE tokenizer, plain and chat, and chat with the two SentencePiece-style
    tokenizers, against the `lm_eval` command line itself."""
    search_export_and_compare(world, kind, family, tmp_path, monkeypatch, prompts=CHAT if chat else None, cli=True)


def test_space_prompt_options_reach_the_worker_requests(world: World, tmp_path: Path) -> None:
    """The space's `prompts:` block goes into every payload (and so the cache key) and the worker
    builds chat-templated requests from it; a bad block is one line naming the field."""
    from evomerge.search.payload import make_payload
    from evomerge.search.space import SearchSpace, load_space_config
    from evomerge.workers.candidate import Candidate
    from evomerge.workers.fitness import FitnessWorker

    models = world.family("bpe", "gemma2")
    space = SearchSpace(load_space_config(write_space(world, models, tmp_path / "s.yaml", CHAT)), root=tmp_path)
    plain = SearchSpace(load_space_config(write_space(world, models, tmp_path / "p.yaml", None)), root=tmp_path)
    recipe = space.decode(space.x0)
    payload = make_payload(recipe, space.config, "validation", full=True)
    assert payload["prompts"] == CHAT.model_dump(mode="json")
    assert "prompts" not in make_payload(recipe, plain.config, "validation", full=True)
    worker = FitnessWorker(sources=[str(models[n]) for n in ("base", "ft1", "ft2")], include_paths=[str(world.tasks)])
    result = worker.evaluate(Candidate("c", payload))
    assert result.status == "ok", result.reason
    task = worker._loaded([rm.GEN_TASK, rm.MC_TASK], "validation", [str(world.tasks)]).task_dict["tasks"][rm.GEN_TASK]
    assert all("<|im_start|>system\nAnswer with one word." in i.args[0] for i in task.instances)
    staged = worker.evaluate(Candidate("s", {**payload, "window": [0, 5], "order_seed": 3}))  # fidelity stages
    assert staged.status == "ok" and len(task.instances) == 5
    assert all("<|im_start|>system\nAnswer with one word." in i.args[0] for i in task.instances)
    result = worker.evaluate(Candidate("d", make_payload(recipe, plain.config, "validation", full=True)))
    assert result.status == "ok" and not any("<|im_start|>" in i.args[0] for i in task.instances)

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (tmp_path / "p.yaml").read_text() + "prompts: {fewshot_as_multiturn: true}\n",
        encoding="utf-8",
    )
    with pytest.raises(EvomergeError) as error:
        load_space_config(bad)
    assert "\n" not in str(error.value) and str(error.value).startswith("prompts: fewshot_as_multiturn")


def test_the_worker_scores_each_candidate_with_its_own_tokenizer(world: World, tmp_path: Path) -> None:
    """Two recipes over the same models that differ only in `tokenizer_source` are written into the
    same resident model; each must still be scored with its own tokenizer (here: its own chat
    template), whatever the worker scored before."""
    import shutil

    from evomerge.workers.candidate import Candidate
    from evomerge.workers.fitness import FitnessWorker

    models = world.family("bpe", "gemma2")
    shouting = tmp_path / "ft2-shouting"
    shutil.copytree(models["ft2"], shouting)
    config_file = shouting / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = config["chat_template"].replace("{{ m['role'] }}", "{{ m['role'] | upper }}")
    config_file.write_text(json.dumps(config), encoding="utf-8")
    sources = [str(models["ft1"]), str(shouting)]

    def payload(tokenizer_source: str) -> dict[str, Any]:
        recipe = {
            "merge_method": "linear",
            "models": [{"model": s, "parameters": {"weight": 0.5}} for s in sources],
            "tokenizer_source": tokenizer_source,
        }
        tasks = [{"name": rm.GEN_FEWSHOT_TASK, "metric": "exact_match"}]
        return {"recipe": recipe, "tasks": tasks, "split": "validation", "prompts": {"apply_chat_template": True}}

    def prompts(worker: FitnessWorker) -> list[str]:
        loaded = worker._loaded([rm.GEN_FEWSHOT_TASK], "validation", [str(world.tasks)])
        return [i.args[0] for i in loaded.task_dict["tasks"][rm.GEN_FEWSHOT_TASK].instances]

    worker = FitnessWorker(sources=sources, include_paths=[str(world.tasks)])
    first = worker.evaluate(Candidate("a", payload(sources[0])))
    assert first.status == "ok", first.reason
    assert all("<|im_start|>user" in p for p in prompts(worker))
    second = worker.evaluate(Candidate("b", payload(sources[1])))
    assert second.status == "ok", second.reason
    assert all("<|im_start|>USER" in p and "<|im_start|>user" not in p for p in prompts(worker))
    fresh = FitnessWorker(sources=sources, include_paths=[str(world.tasks)]).evaluate(
        Candidate("b", payload(sources[1]))
    )
    assert second.metrics == fresh.metrics


def test_lean_decode_steps_aside_when_a_candidate_brings_a_generation_config_it_cannot_follow(world: World) -> None:
    """The materializer sets each candidate's generation config (its donor's) on a reused model:
    one with a repetition penalty must go to HF `generate` (and give what HFLM gives), the next
    plain one back to the lean decode."""
    model, tokenizer = load_model_and_tokenizer(world.family("bpe", "gemma2")["base"])
    requests = generation_requests(world, make_lm(model, tokenizer), "bpe")
    lean = make_lm(model, tokenizer, batch_size=64)
    plain_config = model.generation_config
    first = lean.generate_until(requests)
    penalised = copy.deepcopy(plain_config)
    penalised.repetition_penalty = 3.0
    model.generation_config = penalised
    second = lean.generate_until(requests)
    assert lean.lean_calls == 1  # answered by HF generate
    assert second == make_lm(model, tokenizer, batch_size=64, lean=False).generate_until(requests)
    assert second != first  # the penalty changes outputs: the lean decode would have ignored it
    model.generation_config = plain_config
    assert lean.generate_until(requests) == first and lean.lean_calls == 2
