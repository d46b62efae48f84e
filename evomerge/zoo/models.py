"""The embedded toy model zoo: a tiny Llama base and experts fine-tuned from it.

It stands in for "a base LLM and its fine-tunes" so that every feature runs offline on two CPU
cores. The base is pre-trained on a mixture in which the expert tasks are rare (it is weak on
them but not clueless); each expert is fine-tuned on its task with a replay of the base mixture
(without replay, experts forget shared skills and every merge collapses). Training runs on one
thread with fixed seeds, so the same seed gives the same bytes on one machine; another CPU's
kernels may train a different zoo. So the zoo the demo and the tests use is shipped in the
repository (`paths.shipped_zoo`), and every zoo directory carries a SHA256SUMS file that
`verify_zoo` checks before a search uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evomerge.errors import EvomergeError
from evomerge.io.file_modes import apply_umask
from evomerge.io.paths import tasks_dir
from evomerge.zoo.toy_tasks import EXPERT_TASKS, TASKS, held_out_prompts, read_split

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TOKEN_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz" + "ARKCS:+="
SEQ_LEN = 16  # longest example: "R:abcdef=fedcba<eos>"
BASE_MIX = {"toy_add": 0.15, "toy_rev": 0.01, "toy_shift": 0.002, "toy_copy": 0.35, "toy_sort": 0.488}
EXPERT_DIRS = {"toy_add": "add", "toy_rev": "rev", "toy_shift": "shift"}
HAND_MERGE = ("add", "rev", 0.8)  # task arithmetic of these two experts with this weight each
# The demo needs experts that are far better than the base on their own task, and a hand merge
# that beats either expert on the mean of the two merged tasks (merging pays) but leaves room for
# the search (below 0.90 on one task). Margins are in test exact match, checked by `targets`.
EXPERT_MARGIN = 0.5
HAND_MERGE_MARGIN = 0.05
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c` format, paths relative to the zoo directory


@dataclass(frozen=True)
class ZooConfig:
    """Model size and training schedule of one zoo flavour."""

    hidden: int
    layers: int
    heads: int
    base_steps: int
    expert_steps: dict[str, int]
    base_lr: float = 3e-3
    expert_lr: float = 1e-3
    replay: float = 0.2
    batch: int = 32
    eval_limit: int | None = None  # None: the whole test split
    base_mix: dict[str, float] = field(default_factory=lambda: dict(BASE_MIX))


FULL = ZooConfig(
    hidden=64, layers=4, heads=4, base_steps=1500, expert_steps={"toy_add": 1500, "toy_rev": 300, "toy_shift": 300}
)
MINI = ZooConfig(
    hidden=32,
    layers=2,
    heads=2,
    base_steps=1500,
    expert_steps={"toy_add": 500, "toy_rev": 800, "toy_shift": 200},
    expert_lr=2e-3,
    eval_limit=200,
)


def build_tokenizer(chars: str = TOKEN_CHARS):
    """A character-level fast tokenizer over `chars` (after the special tokens) that AutoTokenizer
    reloads offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.model_max_length = 64
    return tok


CHAR_IDS = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(TOKEN_CHARS)}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def encode(text: str) -> list[int]:
    """Token ids without the tokenizer's per-call overhead (identical ids)."""
    return [CHAR_IDS[c] for c in text]


def new_model(
    cfg: Any, seed: int, vocab_size: int = len(SPECIAL_TOKENS) + len(TOKEN_CHARS), tie_word_embeddings: bool = True
):
    """A seeded char-level Llama of `cfg`'s hidden size, layers and heads (toy and composition zoos)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


class ExampleStream:
    """Training examples from a task mixture, never one of the held-out prompts. `tasks` and
    `encoder` default to the toy zoo's; the composition zoo passes its own (same PAD/EOS ids)."""

    def __init__(
        self,
        mix: dict[str, float],
        seed: str,
        held_out: set[str],
        tasks: Mapping[str, Any] | None = None,
        encoder: Callable[[str], list[int]] | None = None,
        seq_len: int = SEQ_LEN,
    ):
        self.names, self.weights = list(mix), list(mix.values())
        self.rng = random.Random(seed)
        self.held_out = held_out
        self.tasks = tasks if tasks is not None else TASKS
        self.encode = encoder or encode
        self.seq_len = seq_len

    def sample(self) -> tuple[str, str]:
        task = self.tasks[self.rng.choices(self.names, self.weights)[0]]
        while True:
            prompt, answer = task.generate(self.rng)
            if prompt not in self.held_out:
                return prompt, answer

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and answer-only next-token labels (-100 elsewhere)."""
        ids = torch.full((size, self.seq_len), PAD_ID, dtype=torch.long)
        labels = torch.full((size, self.seq_len), -100, dtype=torch.long)
        for i in range(size):
            prompt, answer = self.sample()
            p, a = self.encode(prompt), self.encode(answer) + [EOS_ID]
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
        return ids, labels


def expert_mix(task: str, cfg: ZooConfig) -> dict[str, float]:
    """The expert's task, plus a replay share of the base mixture (which may contain the task too)."""
    total = sum(cfg.base_mix.values())
    mix = {k: cfg.replay * w / total for k, w in cfg.base_mix.items()}
    mix[task] = mix.get(task, 0.0) + 1 - cfg.replay
    return mix


def train(model, stream: ExampleStream, steps: int, lr: float, batch: int, progress=None, params=None) -> None:
    """AdamW with linear warm-up and decay; answer-only cross-entropy. `params`: the parameters to
    train (default all; the composition zoo trains chosen layers)."""
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    model.train()
    for _ in range(steps):
        ids, labels = stream.batch(batch)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress()
    model.eval()


@torch.no_grad()
def greedy_hits(model, rows: list[dict], batch: int = 500) -> list[bool]:
    """Per-example greedy exact match of the answer (all prompts of a task share one length)."""
    hits: list[bool] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        x = torch.tensor([encode(r["prompt"]) for r in chunk])
        n_prompt, n_answer = x.shape[1], len(chunk[0]["answer"])
        for _ in range(n_answer + 1):  # the answer, then <eos>
            nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        gold = torch.tensor([encode(r["answer"]) + [EOS_ID] for r in chunk])
        hits.extend((x[:, n_prompt:] == gold).all(dim=1).tolist())
    return hits


def exact_match(model, task: str, split: str = "test", limit: int | None = None) -> float:
    rows = read_split(tasks_dir(), task, split)[:limit]
    hits = greedy_hits(model, rows)
    return sum(hits) / len(hits)


def score(model, limit: int | None) -> dict[str, float]:
    return {t: round(exact_match(model, t, "test", limit), 4) for t in EXPERT_TASKS}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise EvomergeError(f"OUT_DIR {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise EvomergeError(
            f"OUT_DIR {out_dir} exists and is not a zoo (no manifest.json); pass a new or empty directory"
        )


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp with renames only, so a reader never sees a half-written zoo."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_zoo(out_dir: Path, seed: int = 0, mini: bool = False, quiet: bool = False) -> dict:
    """Train base + experts, score every model on every test split, write OUT_DIR atomically."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    cfg = MINI if mini else FULL
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible and fastest for these sizes (stack.md §3)
    try:
        held_out = held_out_prompts(tasks_dir())
        tokenizer = build_tokenizer()
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        total = cfg.base_steps + sum(cfg.expert_steps.values())
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=quiet,
        ) as bar:
            job = bar.add_task("zoo: base", total=total)
            step = lambda: bar.advance(job)  # noqa: E731
            model = new_model(cfg, seed)
            train(
                model,
                ExampleStream(cfg.base_mix, f"{seed}:base", held_out),
                cfg.base_steps,
                cfg.base_lr,
                cfg.batch,
                step,
            )
            base_state = _state(model)
            states = {"base": base_state}
            for task, steps in cfg.expert_steps.items():
                bar.update(job, description=f"zoo: {EXPERT_DIRS[task]}")
                model.load_state_dict(base_state)
                mix = expert_mix(task, cfg)
                train(model, ExampleStream(mix, f"{seed}:{task}", held_out), steps, cfg.expert_lr, cfg.batch, step)
                states[EXPERT_DIRS[task]] = _state(model)
        train_seconds = time.perf_counter() - started

        models: dict[str, dict] = {}
        for name, state in states.items():
            model.load_state_dict(state)
            task = next((t for t, d in EXPERT_DIRS.items() if d == name), None)
            models[name] = {
                "role": "base" if task is None else "expert",
                "task": task,
                "test_exact_match": score(model, cfg.eval_limit),
            }
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        hand = hand_merge_check(model, states, cfg.eval_limit)
        build_seconds = round(time.perf_counter() - started, 1)
        manifest = {
            "seed": seed,
            "build_seconds": build_seconds,
            "train_seconds": round(train_seconds, 1),
            "mini": mini,
            "tasks": list(EXPERT_TASKS),
            "models": models,
            "hand_merge": hand,
            "targets": targets(models, hand, build_seconds, mini),
            "config": asdict(cfg),
            "torch": torch.__version__,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_checksums(tmp)
        apply_umask(tmp)  # safetensors (under save_pretrained) creates the weight files 0600
        _swap_into_place(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
    if not quiet:
        print_manifest(manifest)
    return manifest


def hand_merge_check(model, states: dict, limit: int | None) -> dict:
    """Task arithmetic of two experts: the reference point a search has to beat."""
    a, b, weight = HAND_MERGE
    base = states["base"]
    merged = {k: base[k] + weight * (states[a][k] - base[k]) + weight * (states[b][k] - base[k]) for k in base}
    model.load_state_dict(merged)
    return {"method": "task_arithmetic", "models": [a, b], "weight": weight, "test_exact_match": score(model, limit)}


def targets(models: dict, hand: dict, build_seconds: float, mini: bool) -> dict:
    """The zoo's acceptance targets, evaluated on the measured scores (the full zoo must pass)."""
    experts = {n: m for n, m in models.items() if m["role"] == "expert"}
    base = models["base"]["test_exact_match"]
    a, b, _ = HAND_MERGE
    ta, tb = models[a]["task"], models[b]["task"]
    pair_mean = lambda scores: (scores[ta] + scores[tb]) / 2  # noqa: E731
    hand_scores = hand["test_exact_match"]
    best_expert = max(pair_mean(models[a]["test_exact_match"]), pair_mean(models[b]["test_exact_match"]))
    return {
        "expert_own_task_ge_0.90": all(m["test_exact_match"][m["task"]] >= 0.90 for m in experts.values()),
        f"expert_beats_base_on_own_task_by_{EXPERT_MARGIN:.2f}": all(
            m["test_exact_match"][m["task"]] >= base[m["task"]] + EXPERT_MARGIN for m in experts.values()
        ),
        "expert_other_tasks_le_0.30": all(
            s <= 0.30 for m in experts.values() for t, s in m["test_exact_match"].items() if t != m["task"]
        ),
        f"hand_merge_beats_best_expert_on_pair_mean_by_{HAND_MERGE_MARGIN:.2f}": pair_mean(hand_scores)
        >= best_expert + HAND_MERGE_MARGIN,
        "hand_merge_below_0.90_somewhere": min(hand_scores[ta], hand_scores[tb]) < 0.90,
        "build_seconds_within_budget": build_seconds <= (60 if mini else 300),
    }


def print_manifest(manifest: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"toy zoo (seed {manifest['seed']}, {manifest['build_seconds']} s)")
    table.add_column("model")
    for t in manifest["tasks"]:
        table.add_column(t, justify="right")
    rows = [(n, m["test_exact_match"]) for n, m in manifest["models"].items()]
    rows.append(("task_arith(add,rev) 0.8", manifest["hand_merge"]["test_exact_match"]))
    for name, scores in rows:
        table.add_row(name, *(f"{scores[t]:.3f}" for t in manifest["tasks"]))
    Console().print(table)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checksums(zoo_dir: Path) -> None:
    """SHA256SUMS over every file of the zoo (weights, configs, tokenizers, manifest)."""
    files = sorted(p for p in zoo_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(p)}  {p.relative_to(zoo_dir).as_posix()}\n" for p in files]
    (zoo_dir / CHECKSUMS).write_text("".join(lines))


def read_checksums(zoo_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 hex digest, as written by `write_checksums` (or `sha256sum`)."""
    sums = zoo_dir / CHECKSUMS
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text().splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](\S.*)", line)
        if match is None:
            raise EvomergeError(f"{sums}:{number}: not a `sha256sum` line; {_fix(zoo_dir)}")
        listed[match.group(2)] = match.group(1)
    return listed


def _fix(zoo_dir: Path) -> str:
    """The remedy every verification error ends with."""
    return f"restore it (`git checkout -- {zoo_dir}`, the shipped zoo) or rebuild it (`evomerge zoo build {zoo_dir}`)"


def verify_zoo(path: Path, seed: int | None = None, mini: bool | None = None) -> dict:
    """Check a zoo directory before use and return its manifest; the first problem is one EvomergeError line.

    Every file must match SHA256SUMS, no unlisted file may sit beside them (it could change what
    loads), the manifest must list exactly the model directories, and `seed` / `mini`, when given,
    must be what the zoo was built with.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise EvomergeError(f"zoo {path} does not exist; {_fix(path)}")
    manifest_path, sums = path / "manifest.json", path / CHECKSUMS
    for required in (manifest_path, sums):
        if not required.is_file():
            raise EvomergeError(f"{required} is missing, so {path} is not a verifiable zoo; {_fix(path)}")
    listed = read_checksums(path)
    for name, digest in listed.items():
        file = path / name
        if not file.is_file():
            raise EvomergeError(f"{file} is missing (listed in {sums}); {_fix(path)}")
        if _sha256(file) != digest:
            raise EvomergeError(f"{file} does not match its checksum in {sums}; {_fix(path)}")
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p != sums):
        if file.relative_to(path).as_posix() not in listed:
            raise EvomergeError(f"{file} is not listed in {sums}; remove it or {_fix(path)}")
    manifest = json.loads(manifest_path.read_text())
    dirs = sorted({name.split("/")[0] for name in listed if "/" in name})
    if sorted(manifest.get("models", {})) != dirs:
        raise EvomergeError(
            f"{manifest_path} lists models {sorted(manifest.get('models', {}))}, {sums} covers {dirs}; {_fix(path)}"
        )
    for key, wanted in (("seed", seed), ("mini", mini)):
        if wanted is not None and manifest.get(key) != wanted:
            raise EvomergeError(
                f"{path} was built with {key} {manifest.get(key)}, not {wanted}: "
                f"point zoo.path at another zoo or build one (`evomerge zoo build DIR --seed N [--mini]`)"
            )
    return manifest
