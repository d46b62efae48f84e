"""The composition zoo: EvoLLM-JP in miniature (a language expert and a math expert, a target neither solves).

Two "languages" share one character vocabulary: L2 is a full substitution script of L1 (every
L1 character, digits, letters, operators and task markers included, has its own L2 character),
like a second writing system. The base sees both languages (L1 often, L2 rarely: a low-resource
language), translation between them (to tie the two scripts to one internal representation)
and basic skills (copy, reversal, one-step `ab+c` / `ab-c` in both scripts). From it, each with
20 % replay of the base mixture:

- the **language expert** is fine-tuned on L2 tasks with no arithmetic (copy, reversal,
  translation into L1);
- the **math expert** is fine-tuned on two-step arithmetic (`ab+c-d=`) in L1 only;
- the **target** `comp_math_l2` is the same two-step arithmetic posed and answered in L2.

Neither source reaches `TARGET_BAR` on the target; each is strong on its own task
(`comp_math_l1`, `comp_lang_l2`). 8 layers (the toy zoo has 4) so that paths can reorder them.
Training, determinism and checksums work as in `evomerge.zoo.models`. Measured (docs/zoo.md): at
this scale no merge of the two composes; the zoo is the test bed that shows it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.io.file_modes import apply_umask
from evomerge.io.paths import tasks_dir
from evomerge.zoo import models, toy_tasks
from evomerge.zoo.composition_yaml import TASK_DOCS, YAML
from evomerge.zoo.models import SPECIAL_TOKENS, ExampleStream, _check_out_dir, _swap_into_place, write_checksums

L1_DIGITS = "0123456789"
L1_LETTERS = "abcdefghij"
L1_MARKS = "krt+-=:"  # k copy, r reverse, t translate, operators, separator
L1 = L1_DIGITS + L1_LETTERS + L1_MARKS
L2 = "ABCDEFGHIJ" + "KLMNOPQRST" + "UVW#%@;"  # L2's character for each L1 character, in order
TO_L2 = str.maketrans(L1, L2)
TO_L1 = str.maketrans(L2, L1)
# L2 written with L1 numerals (a base that has never seen L2's own digits; variants only)
TO_L2_MIXED = str.maketrans(L1[len(L1_DIGITS) :], L2[len(L1_DIGITS) :])
TOKEN_CHARS = L1 + L2
SEQ_LEN = 16  # longest example: "k:abc123=abc123<eos>"
WORD_LEN = 6
WORD_CHARS = L1_LETTERS + L1_DIGITS + "+-"  # operators too, so translation ties both scripts' operators
DATA_SEED = 20240320  # fixed: the held-out splits never change with the zoo's --seed
SPLIT_SIZES = {"train": 1000, "validation": 500, "test": 500}
TARGET_BAR = 0.25  # a source "solves" the target at or above this test exact match
CHAR_IDS = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(TOKEN_CHARS)}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(WORD_CHARS) for _ in range(WORD_LEN))


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"k:{w}=", w


def _rev(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"r:{w}=", w[::-1]


def _translate(rng: random.Random) -> tuple[str, str]:
    """L1 word -> its L2 spelling (the L2 version of this task translates back into L1)."""
    w = _word(rng)
    return f"t:{w}=", w.translate(TO_L2)


def _add(rng: random.Random) -> tuple[str, str]:
    """One step: `ab+c=` (three-digit answer, like every arithmetic answer here)."""
    a, b = rng.randrange(10, 100), rng.randrange(10)
    return f"{a}+{b}=", f"{a + b:03d}"


def _sub(rng: random.Random) -> tuple[str, str]:
    """One step: `ab-c=`."""
    a, b = rng.randrange(10, 100), rng.randrange(10)
    return f"{a}-{b}=", f"{a - b:03d}"


def _multi(rng: random.Random) -> tuple[str, str]:
    """Two steps: `ab+c-d=` (the intermediate sum is never written)."""
    a, b, c = rng.randrange(10, 100), rng.randrange(10), rng.randrange(10)
    return f"{a}+{b}-{c}=", f"{a + b - c:03d}"


def _larger(rng: random.Random) -> tuple[str, str]:
    """The larger of two numbers, `47:82=` -> `082` (numbers compared, nothing computed; variants only)."""
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}:{b}=", f"{max(a, b):03d}"


def posed_in_l2(generate: Callable[[random.Random], tuple[str, str]]) -> Callable[[random.Random], tuple[str, str]]:
    """The task posed in L2 and answered in L1 (a model that reads L2 but writes L1; variants only)."""

    def generate_l2_question(rng: random.Random) -> tuple[str, str]:
        prompt, answer = generate(rng)
        return prompt.translate(TO_L2), answer

    return generate_l2_question


def in_mixed_l2(generate: Callable[[random.Random], tuple[str, str]]) -> Callable[[random.Random], tuple[str, str]]:
    """The task posed and answered in L2 with L1 numerals (translation tasks: into L1)."""

    def generate_mixed(rng: random.Random) -> tuple[str, str]:
        prompt, answer = generate(rng)
        if prompt.startswith("t:"):  # the word in mixed L2, its L1 spelling as the answer
            return prompt.translate(TO_L2_MIXED), answer.translate(TO_L1)
        return prompt.translate(TO_L2_MIXED), answer.translate(TO_L2_MIXED)

    return generate_mixed


def _translate_mixed(rng: random.Random) -> tuple[str, str]:
    """L1 word -> its L2 spelling with L1 numerals."""
    w = _word(rng)
    return f"t:{w}=", w.translate(TO_L2_MIXED)


def in_l2(generate: Callable[[random.Random], tuple[str, str]]) -> Callable[[random.Random], tuple[str, str]]:
    """The same task posed and answered in L2 (a translation task then translates L2 into L1)."""

    def generate_l2(rng: random.Random) -> tuple[str, str]:
        prompt, answer = generate(rng)
        return prompt.translate(TO_L2), answer.translate(TO_L2 if answer == answer.translate(TO_L1) else TO_L1)

    return generate_l2


TASK_GENERATORS = {"copy": _copy, "rev": _rev, "translate": _translate, "add": _add, "sub": _sub, "larger": _larger}


@dataclass(frozen=True)
class CompTask:
    """One synthetic task of the composition zoo."""

    name: str
    generate: Callable[[random.Random], tuple[str, str]]
    lm_eval: bool  # True: written as an lm-eval task with held-out splits


TASKS: dict[str, CompTask] = {
    t.name: t
    for t in (
        CompTask("l1_copy", _copy, False),
        CompTask("l1_rev", _rev, False),
        CompTask("l1_translate", _translate, False),
        CompTask("l1_add", _add, False),
        CompTask("l1_sub", _sub, False),
        CompTask("comp_math_l1", _multi, True),
        CompTask("l2_copy", in_l2(_copy), False),
        CompTask("comp_lang_l2", in_l2(_rev), True),
        CompTask("l2_translate", in_l2(_translate), False),
        CompTask("l2_add", in_l2(_add), False),
        CompTask("l2_sub", in_l2(_sub), False),
        CompTask("comp_math_l2", in_l2(_multi), True),
        CompTask("l2q_rev", posed_in_l2(_rev), False),
        CompTask("l2q_add", posed_in_l2(_add), False),
        CompTask("l2q_sub", posed_in_l2(_sub), False),
        CompTask("l2q_multi", posed_in_l2(_multi), False),
        CompTask("l1_translate_mixed", _translate_mixed, False),
        CompTask("l1_larger", _larger, False),
        CompTask("l2_larger", in_l2(_larger), False),
        *(CompTask(f"l2m_{n}", in_mixed_l2(g), False) for n, g in TASK_GENERATORS.items()),
    )
}
EVAL_TASKS = ["comp_math_l2", "comp_math_l1", "comp_lang_l2"]
TARGET = "comp_math_l2"


BASE_MIX = {
    "l1_copy": 0.15,
    "l1_rev": 0.15,
    "l1_translate": 0.1,
    "l1_add": 0.2,
    "l1_sub": 0.2,
    "l2_copy": 0.05,
    "comp_lang_l2": 0.02,
    "l2_translate": 0.1,
    "l2_add": 0.03,
    "l2_sub": 0.03,
}


@dataclass(frozen=True)
class CompConfig:
    """Model size, training mixtures and schedule of the composition zoo.

    `parts` says what each expert fine-tunes: None (every parameter, the shipped zoo) or a tuple
    of decoder layer indices and the names "l2_rows" (the L2 rows of the embeddings and, untied,
    of the head), "char_rows" (every character's rows), "l2_head_rows" (the L2 rows of an untied
    head) and "head" (the whole untied head): the variants of docs/zoo.md
    (benchmarks/composition_variants.py). `replay_tasks` are the base tasks replayed (`replay` of
    each expert's batches): the whole base mixture for both, so neither forgets the base's skills.
    """

    hidden: int = 64
    layers: int = 8
    tie_embeddings: bool = True
    heads: int = 4
    base_steps: int = 2500
    expert_steps: dict[str, int] = field(default_factory=lambda: {"lang": 1200, "math": 1500})
    base_lr: float = 3e-3
    expert_lr: dict[str, float] = field(default_factory=lambda: {"lang": 1e-3, "math": 1e-3})
    batch: int = 32
    replay: dict[str, float] = field(default_factory=lambda: {"lang": 0.2, "math": 0.2})
    replay_tasks: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"lang": tuple(BASE_MIX), "math": tuple(BASE_MIX)}
    )
    parts: dict[str, Any] = field(default_factory=lambda: {"lang": None, "math": None})
    base_mix: dict[str, float] = field(default_factory=lambda: dict(BASE_MIX))
    lang_mix: dict[str, float] = field(
        default_factory=lambda: {"l2_copy": 0.3, "comp_lang_l2": 0.5, "l2_translate": 0.2}
    )
    math_mix: dict[str, float] = field(default_factory=lambda: {"comp_math_l1": 1.0})
    eval_limit: int | None = None
    # variants: the language expert starts L2's numeral rows from L1's (a new script's embeddings
    # initialised from aligned tokens of the old vocabulary, as WECHSEL and FOCUS do)
    lang_aligned_numerals: bool = False


def encode(text: str) -> list[int]:
    return [CHAR_IDS[c] for c in text]


def build_tokenizer():
    """Character-level fast tokenizer over both scripts (reloads offline with AutoTokenizer)."""
    return models.build_tokenizer(TOKEN_CHARS)


def new_model(cfg: CompConfig, seed: int):
    vocab_size = len(SPECIAL_TOKENS) + len(TOKEN_CHARS)
    return models.new_model(cfg, seed, vocab_size=vocab_size, tie_word_embeddings=cfg.tie_embeddings)


# -- held-out splits ---------------------------------------------------------------------------


def make_splits(task: CompTask) -> dict[str, list[dict]]:
    return toy_tasks.make_splits(task, SPLIT_SIZES, DATA_SEED)


def held_out(splits: dict[str, dict[str, list[dict]]]) -> set[str]:
    """Validation and test prompts of every lm-eval task, in both scripts: training never sees them."""
    prompts = set()
    for by_split in splits.values():
        for split in ("validation", "test"):
            for row in by_split[split]:
                prompts.add(row["prompt"].translate(TO_L1))
                prompts.add(row["prompt"].translate(TO_L2))
                prompts.add(row["prompt"].translate(TO_L1).translate(TO_L2_MIXED))
    return prompts


L2_IDS = torch.tensor([CHAR_IDS[c] for c in L2])


CHAR_ROW_IDS = torch.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(TOKEN_CHARS))
# part name -> (rows, matrices): the embeddings and, untied, the head, or the head alone
ROWS = {
    "l2_rows": (L2_IDS, ("embed", "head")),
    "char_rows": (CHAR_ROW_IDS, ("embed", "head")),
    "l2_head_rows": (L2_IDS, ("head",)),
}


def _masked_rows(model, ids: torch.Tensor, matrices: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The matrices with gradients masked to rows `ids` (AdamW without weight decay leaves rows
    whose gradient is always 0 unchanged); a tied head is the embedding matrix."""
    weights = [model.model.embed_tokens.weight] if "embed" in matrices else []
    if "head" in matrices and not (weights and model.config.tie_word_embeddings):
        weights.append(model.lm_head.weight)
    for weight in weights:
        mask = torch.zeros(weight.shape[0], 1)
        mask[ids] = 1.0
        weight.register_hook(lambda grad, mask=mask: grad * mask)
    return weights


def trainable(model, part: tuple[int | str, ...] | None) -> list[torch.nn.Parameter]:
    """Every parameter (None), or the named rows / head first, then the listed decoder layers."""
    if part is None:
        return list(model.parameters())
    params: list[torch.nn.Parameter] = []
    for item in part:
        if item in ROWS:
            params += _masked_rows(model, *ROWS[item])
        elif item == "head":
            params.append(model.lm_head.weight)
    for item in part:
        if isinstance(item, int):
            params += list(model.model.layers[item].parameters())
    return params


def train(
    model, stream: ExampleStream, steps: int, lr: float, batch: int, part: tuple[int | str, ...] | None = None
) -> None:
    models.train(model, stream, steps, lr, batch, params=trainable(model, part))


@torch.no_grad()
def exact_match(model, rows: list[dict]) -> float:
    x = torch.tensor([encode(r["prompt"]) for r in rows])
    n_prompt, n_answer = x.shape[1], len(rows[0]["answer"])
    for _ in range(n_answer + 1):
        nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    gold = torch.tensor([encode(r["answer"]) + [EOS_ID] for r in rows])
    return (x[:, n_prompt:] == gold).all(dim=1).float().mean().item()


def _mix_with_replay(own: dict[str, float], replay: float, tasks: tuple[str, ...], cfg: CompConfig) -> dict[str, float]:
    total_own = sum(own.values())
    mix = {k: (1 - replay) * v / total_own for k, v in own.items()}
    total = sum(cfg.base_mix[k] for k in tasks)
    for k in tasks:
        mix[k] = mix.get(k, 0.0) + replay * cfg.base_mix[k] / total
    return mix


def train_base(cfg: CompConfig, seed: int, held: set[str]) -> dict[str, torch.Tensor]:
    model = new_model(cfg, seed)
    stream = ExampleStream(cfg.base_mix, f"{seed}:base", held, TASKS, encode, SEQ_LEN)
    train(model, stream, cfg.base_steps, cfg.base_lr, cfg.batch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def align_numerals(model) -> None:
    """Copy each L1 digit's embedding (and untied head) row onto its L2 numeral's row."""
    l1 = torch.tensor([CHAR_IDS[c] for c in L1_DIGITS])
    l2 = torch.tensor([CHAR_IDS[c] for c in L1_DIGITS.translate(TO_L2)])
    for weight in {id(w): w for w in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
        weight[l2] = weight[l1]


def train_expert(
    cfg: CompConfig, seed: int, held: set[str], base: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """Fine-tune `name` ("lang" or "math") from the base: its mixture with replay, its parts."""
    model = new_model(cfg, seed)  # fresh: no gradient hook of an earlier expert
    model.load_state_dict(base)
    if name == "lang" and cfg.lang_aligned_numerals:
        align_numerals(model)
    part = cfg.parts[name]
    part = tuple(part) if isinstance(part, list) else part
    own = cfg.lang_mix if name == "lang" else cfg.math_mix
    mix = _mix_with_replay(own, cfg.replay[name], tuple(cfg.replay_tasks[name]), cfg)
    stream = ExampleStream(mix, f"{seed}:{name}", held, TASKS, encode, SEQ_LEN)
    train(model, stream, cfg.expert_steps[name], cfg.expert_lr[name], cfg.batch, part)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_states(cfg: CompConfig, seed: int, held: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    base = train_base(cfg, seed, held)
    return {"base": base, **{name: train_expert(cfg, seed, held, base, name) for name in ("lang", "math")}}


# -- lm-eval task files ----------------------------------------------------------------------------


def all_splits() -> dict[str, dict[str, list[dict]]]:
    return {name: make_splits(task) for name, task in TASKS.items() if task.lm_eval}


def write_task_files(out: Path) -> list[Path]:
    """(Re)write the lm-eval YAML and jsonl splits of the composition tasks (deterministic)."""
    written = []
    for name, by_split in all_splits().items():
        for split, rows in by_split.items():
            path = Path(out) / "data" / f"{name}_{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            written.append(path)
        max_gen = len(by_split["test"][0]["answer"]) + 1
        path = Path(out) / f"{name}.yaml"
        path.write_text(YAML.format(doc=TASK_DOCS[name], name=name, max_gen=max_gen))
        written.append(path)
    return written


def read_split(name: str, split: str) -> list[dict]:
    with open(tasks_dir() / "data" / f"{name}_{split}.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- the zoo -------------------------------------------------------------------------------------

MODEL_TASKS = {"base": None, "lang": "comp_lang_l2", "math": "comp_math_l1"}
EXPERT_MARGIN = 0.3  # an expert beats the base on its own task by at least this (test exact match)
OWN_TASK_BAR = 0.8  # and reaches at least this on it


def targets(models: dict[str, dict]) -> dict[str, bool]:
    """The zoo's acceptance targets on the measured test scores."""
    base = models["base"]["test_exact_match"]
    experts = {n: m for n, m in models.items() if m["task"]}
    return {
        f"no_source_reaches_{TARGET_BAR}_on_{TARGET}": all(
            m["test_exact_match"][TARGET] < TARGET_BAR for m in models.values()
        ),
        f"expert_own_task_ge_{OWN_TASK_BAR}": all(
            m["test_exact_match"][m["task"]] >= OWN_TASK_BAR for m in experts.values()
        ),
        f"expert_beats_base_on_own_task_by_{EXPERT_MARGIN}": all(
            m["test_exact_match"][m["task"]] >= base[m["task"]] + EXPERT_MARGIN for m in experts.values()
        ),
    }


HAND_WEIGHTS = (0.5, 0.8, 1.0)


def task_arithmetic(states: dict[str, dict[str, torch.Tensor]], weight: float) -> dict[str, torch.Tensor]:
    """base + weight * (lang - base) + weight * (math - base): the hand merge recorded in the manifest."""
    base = states["base"]
    return {k: base[k] + weight * (states["lang"][k] - base[k]) + weight * (states["math"][k] - base[k]) for k in base}


def build_composition_zoo(out_dir: Path, seed: int = 0, quiet: bool = False, cfg: CompConfig | None = None) -> dict:
    """Train base + language expert + math expert, score them, write OUT_DIR atomically with SHA256SUMS."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    cfg = cfg or CompConfig()
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible on one machine, and fastest at this size
    try:
        splits = {name: {s: read_split(name, s) for s in ("validation", "test")} for name in EVAL_TASKS}
        held = held_out(splits)
        tokenizer = build_tokenizer()
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        states = train_states(cfg, seed, held)
        train_seconds = time.perf_counter() - started
        model = new_model(cfg, seed)

        def scores(state: dict[str, torch.Tensor]) -> dict[str, float]:
            model.load_state_dict(state)
            return {t: round(exact_match(model, splits[t]["test"][: cfg.eval_limit]), 4) for t in EVAL_TASKS}

        models: dict[str, dict] = {}
        for name, state in states.items():
            task = MODEL_TASKS[name]
            models[name] = {
                "role": "base" if task is None else "expert",
                "task": task,
                "test_exact_match": scores(state),
            }
            model.load_state_dict(state)
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        hand = {f"task_arithmetic_{w}": scores(task_arithmetic(states, w)) for w in HAND_WEIGHTS}
        manifest = {
            "kind": "composition",
            "seed": seed,
            "mini": False,
            "build_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(train_seconds, 1),
            "tasks": EVAL_TASKS,
            "target": TARGET,
            "target_bar": TARGET_BAR,
            "models": models,
            "hand_merges": hand,
            "targets": targets(models),
            "config": asdict(cfg),
            "torch": torch.__version__,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_checksums(tmp)
        apply_umask(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
    if not quiet:
        rows = [*((n, m["test_exact_match"]) for n, m in models.items()), *hand.items()]
        for name, row in rows:
            print(f"{name:22s} " + "  ".join(f"{t} {v:.3f}" for t, v in row.items()))
        print("targets:", manifest["targets"])
    return manifest
