"""Synthetic tasks of the toy zoo: generators, fixed held-out splits, lm-eval data files.

Every task is a prompt of fixed length with a fixed-length answer, so batches need no padding
and greedy exact match is cheap. The held-out splits (validation, test) are generated once from a
fixed data seed and committed under tasks/data/; training streams reject any prompt that occurs in
them, so scores on those splits measure generalisation, not recall.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LEN = 6
DATA_SEED = 20240319  # fixed: the held-out splits never change with the zoo's --seed
SPLIT_SIZES = {"train": 1000, "validation": 500, "test": 500}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(WORD_LEN))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"A:{a:02d}+{b:02d}=", f"{a + b:03d}"


def _rev(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"R:{w}=", w[::-1]


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"K:{w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"C:{w}=", w


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"S:{w}=", "".join(sorted(w))


@dataclass(frozen=True)
class ToyTask:
    """One synthetic task: its lm-eval name, example generator and answer length."""

    name: str
    generate: Callable[[random.Random], tuple[str, str]]
    answer_len: int
    expert: bool  # True: an expert is fine-tuned for it and it is an lm-eval task


TASKS: dict[str, ToyTask] = {
    t.name: t
    for t in (
        ToyTask("toy_add", _add, 3, True),
        ToyTask("toy_rev", _rev, WORD_LEN, True),
        ToyTask("toy_shift", _shift, WORD_LEN, True),
        ToyTask("toy_copy", _copy, WORD_LEN, False),
        ToyTask("toy_sort", _sort, WORD_LEN, False),
    )
}
EXPERT_TASKS = [n for n, t in TASKS.items() if t.expert]


def make_splits(task: Any, sizes: dict[str, int] | None = None, data_seed: int = DATA_SEED) -> dict[str, list[dict]]:
    """Disjoint train / validation / test examples for one task (deterministic); any task with a
    `name` and `generate(rng)` (the composition zoo passes its own tasks and seed)."""
    sizes = sizes or SPLIT_SIZES
    rng = random.Random(f"{data_seed}:{task.name}")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split in ("test", "validation", "train"):
        rows = []
        while len(rows) < sizes[split]:
            prompt, answer = task.generate(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": answer})
        splits[split] = rows
    return splits


def data_file(tasks_dir: Path, task: str, split: str) -> Path:
    return Path(tasks_dir) / "data" / f"{task}_{split}.jsonl"


def write_task_data(tasks_dir: Path) -> list[Path]:
    """(Re)generate the committed jsonl files of every expert task; returns the files written."""
    written = []
    for name in EXPERT_TASKS:
        for split, rows in make_splits(TASKS[name]).items():
            path = data_file(tasks_dir, name, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            os.replace(tmp, path)
            written.append(path)
    return written


def read_split(tasks_dir: Path, task: str, split: str) -> list[dict]:
    path = data_file(tasks_dir, task, split)
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def held_out_prompts(tasks_dir: Path) -> set[str]:
    """Prompts of every validation and test split: training must never see them."""
    return {
        row["prompt"]
        for name in EXPERT_TASKS
        for split in ("validation", "test")
        for row in read_split(tasks_dir, name, split)
    }
