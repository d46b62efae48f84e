"""The lean greedy `generate_until` (evomerge.scoring.greedy_lm) answers every request exactly as
lm-eval's HFLM does with HF `generate`: on the zoo's source models, an in-place merged candidate and
a stacked layer-path candidate, for the toy tasks' requests and for requests with other stop strings
and token budgets, at batch sizes that pad differently. Requests lm-eval builds are reused across
candidates without leaking responses from one candidate into the next."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from evomerge.candidates.materialize import Materializer
from evomerge.io.model_loading import load_model_and_tokenizer
from evomerge.scoring.greedy_lm import GreedyHFLM, PromptCache
from evomerge.scoring.lm_tasks import load_tasks, make_lm, metric_values, score_tasks, task_samples
from evomerge.search.space.dfs import Step, path_to_recipe

torch.set_num_threads(1)

TASKS = ("toy_add", "toy_rev", "toy_shift")


def task_requests(split: str, per_task: int | None) -> list[Instance]:
    """The Instances lm-eval builds for the toy tasks (first `per_task` docs of each)."""
    loaded = load_tasks(list(TASKS), split=split)
    out: list[Instance] = []
    for task in loaded.task_dict["tasks"].values():
        task.build_all_requests(limit=per_task, rank=0, world_size=1)
        out += task.instances
    return out


def variants(requests: list[Instance]) -> list[Instance]:
    """The same prompts with other generation kwargs: a stop string the models do produce (so rows
    stop at different steps and the batch stops on the string), several stop strings, a budget
    past the EOS (finished rows are padded), no `until` at all (EOS only), a stop string that
    stops the whole batch at once."""
    kwargs = [
        {"until": ["1"], "max_gen_toks": 6, "do_sample": False},
        {"until": ["a", "0", "<eos>"], "max_gen_toks": 9, "do_sample": False},
        {"max_gen_toks": 12, "do_sample": False},
        {"until": "e", "max_gen_toks": 3, "temperature": 0.0},
        {"until": [""], "max_gen_toks": 5},  # every row "contains" "": lm-eval stops the batch after one token
    ]
    out = []
    for i, request in enumerate(requests):
        context = request.args[0]
        out.append(Instance("generate_until", request.doc, (context, copy.deepcopy(kwargs[i % len(kwargs)])), 0))
    return out


def assert_same_generations(model, tokenizer, requests: list[Instance], batch_sizes=(16, 512)) -> None:
    for batch_size in batch_sizes:
        lean = make_lm(model, tokenizer, batch_size=batch_size, lean=True)
        plain = make_lm(model, tokenizer, batch_size=batch_size, lean=False)
        expected = plain.generate_until(requests)
        got = lean.generate_until(requests)
        assert lean.lean_calls == 1 and plain.lean_calls == 0
        mismatches = [(r.args, a, b) for r, a, b in zip(requests, expected, got, strict=True) if a != b]
        assert not mismatches, mismatches[:5]
        assert lean.generate_until(requests) == expected  # second call: from the cached batch plan


@pytest.fixture(scope="module")
def requests() -> list[Instance]:
    base = task_requests("validation", per_task=40)
    return base + variants(base)


@pytest.fixture(scope="module")
def candidates(mini_zoo: Path) -> dict[str, tuple[torch.nn.Module, object]]:
    """Built once: an in-place TIES merge and a stacked layer path, as the search worker builds them."""
    materializer = Materializer([str(mini_zoo / n) for n in ("base", "add", "rev")])
    ties = materializer.apply(
        {
            "merge_method": "ties",
            "base_model": str(mini_zoo / "base"),
            "models": [
                {"model": str(mini_zoo / "add"), "parameters": {"weight": 0.8, "density": 0.6}},
                {"model": str(mini_zoo / "rev"), "parameters": {"weight": 0.7, "density": 0.5}},
            ],
        },
        seed=3,
    )
    _, tokenizer = load_model_and_tokenizer(mini_zoo / "base")
    out = {"ties": (ties.model, tokenizer)}
    steps = [Step(0, 0), Step(1, 0, 0.9), Step(1, 1), Step(0, 1, 1.2)]
    recipe = path_to_recipe(steps, [str(mini_zoo / "add"), str(mini_zoo / "rev")], ("o_proj", "down_proj"))
    stacked = materializer.apply(recipe.model_dump(mode="json", exclude_none=True))
    assert stacked.mode != "in_place"  # the zero-copy path, not a copy into the resident model
    out["dfs"] = (stacked.model, tokenizer)
    return out


@pytest.mark.parametrize("name", ["base", "add", "rev", "shift"])
def test_lean_generation_equals_hflm_on_each_zoo_model(mini_zoo: Path, requests: list[Instance], name: str) -> None:
    model, tokenizer = load_model_and_tokenizer(mini_zoo / name)
    assert_same_generations(model, tokenizer, requests)


@pytest.mark.parametrize("name", ["ties", "dfs"])
def test_lean_generation_equals_hflm_on_merged_candidates(
    candidates: dict, requests: list[Instance], name: str
) -> None:
    model, tokenizer = candidates[name]
    assert_same_generations(model, tokenizer, requests)


def test_requests_lean_decoding_cannot_reproduce_go_to_hf_generate(mini_zoo: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(mini_zoo / "add")
    prompts = [r.args[0] for r in task_requests("validation", per_task=4)]
    sampled = [
        Instance(
            "generate_until", {}, (p, {"until": ["<eos>"], "max_gen_toks": 4, "do_sample": True, "temperature": 0.5}), 0
        )
        for p in prompts
    ]
    penalised = [
        Instance("generate_until", {}, (p, {"until": ["<eos>"], "max_gen_toks": 4, "repetition_penalty": 1.3}), 0)
        for p in prompts
    ]
    lm = make_lm(model, tokenizer, batch_size=8)
    lm.generate_until(sampled)
    lm.generate_until(penalised)
    assert lm.lean_calls == 0
    model.generation_config.no_repeat_ngram_size = 2  # a logits processor from the model's own config
    greedy = [
        Instance("generate_until", {}, (p, {"until": ["<eos>"], "max_gen_toks": 4, "do_sample": False}), 0)
        for p in prompts
    ]
    configured = make_lm(model, tokenizer, batch_size=8)
    assert configured.generate_until(greedy) == make_lm(model, tokenizer, batch_size=8, lean=False).generate_until(
        greedy
    )
    assert configured.lean_calls == 0


def test_a_prompt_cache_is_shared_across_candidates_with_one_tokenizer(
    mini_zoo: Path, requests: list[Instance]
) -> None:
    cache = PromptCache()
    outputs = {}
    for name in ("add", "rev"):
        model, tokenizer = load_model_and_tokenizer(mini_zoo / name)
        lm = make_lm(model, tokenizer, batch_size=64, prompt_cache=cache)
        assert isinstance(lm, GreedyHFLM)
        outputs[name] = lm.generate_until(requests)
        assert outputs[name] == make_lm(model, tokenizer, batch_size=64, lean=False).generate_until(requests)
    assert outputs["add"] != outputs["rev"]  # the cache holds prompts, never a model's answers


def test_reused_requests_score_like_freshly_built_ones(mini_zoo: Path) -> None:
    """Scoring model A then model B on cached Instances equals scoring B on new task objects; A's
    logged responses survive B's run; another subset gets its own requests."""
    cached = load_tasks(["toy_add", "toy_rev"], split="validation")
    subset = task_samples(cached, {"toy_add": 30, "toy_rev": 30}, 5)
    other = task_samples(cached, {"toy_add": 30, "toy_rev": 30}, 6)
    models = {n: load_model_and_tokenizer(mini_zoo / n) for n in ("add", "rev")}
    lms = {n: make_lm(m, t, batch_size=64) for n, (m, t) in models.items()}

    first = score_tasks(lms["add"], cached, samples=subset, log_samples=True)
    logged = [s["filtered_resps"] for s in first["samples"]["toy_add"]]
    instances = list(cached.task_dict["tasks"]["toy_add"].instances)
    second = score_tasks(lms["rev"], cached, samples=subset, log_samples=True)
    reused = cached.task_dict["tasks"]["toy_add"].instances
    assert len(reused) == 30 and all(a is b for a, b in zip(reused, instances, strict=True))
    assert [s["filtered_resps"] for s in first["samples"]["toy_add"]] == logged

    fresh = load_tasks(["toy_add", "toy_rev"], split="validation")
    expected = score_tasks(lms["rev"], fresh, samples=subset, log_samples=True)
    assert metric_values(second) == metric_values(expected)
    assert [s["filtered_resps"] for s in second["samples"]["toy_add"]] == [
        s["filtered_resps"] for s in expected["samples"]["toy_add"]
    ]
    assert metric_values(first) != metric_values(second)

    moved = score_tasks(lms["rev"], cached, samples=other, log_samples=True)
    task = cached.task_dict["tasks"]["toy_add"]
    docs = task.dataset[task.config.test_split]
    assert [s["doc"] for s in moved["samples"]["toy_add"]] == [docs[i] for i in other["toy_add"]]
    assert metric_values(moved) == metric_values(score_tasks(lms["rev"], fresh, samples=other))


@pytest.mark.slow
def test_lean_generation_equals_hflm_on_the_full_zoo_and_whole_train_splits() -> None:
    """Every train item of the three toy tasks, on each model of the full zoo and a TIES merge of
    the three experts, at the worker's default batch size and the benchmark's."""
    from evomerge.io.paths import shipped_zoo

    zoo = shipped_zoo()
    requests = task_requests("train", per_task=None)
    for name in ("base", "add", "rev", "shift"):
        model, tokenizer = load_model_and_tokenizer(zoo / name)
        assert_same_generations(model, tokenizer, requests, batch_sizes=(64, 512))
    materializer = Materializer([str(zoo / n) for n in ("base", "add", "rev", "shift")])
    merged = materializer.apply(
        {
            "merge_method": "ties",
            "base_model": str(zoo / "base"),
            "models": [
                {"model": str(zoo / n), "parameters": {"weight": w, "density": 0.5}}
                for n, w in (("add", 0.9), ("rev", 0.7), ("shift", 0.6))
            ],
        },
        seed=0,
    )
    assert_same_generations(merged.model, tokenizer, requests, batch_sizes=(64, 512))
