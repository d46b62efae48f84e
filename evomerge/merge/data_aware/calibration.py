"""The recipe's `calibration:` block and the token batches it describes.

Data-aware methods need a little data: RegMean's Gram matrices and Fisher's gradients come from
forward/backward passes over it, REPAIR's activation statistics too. The block names an lm-eval
task (and split) or a local jsonl file, how many examples, their token length and a sampling seed.
A model may be given its own data (`per_model`), as RegMean and Fisher intend: each model's
statistics come from the distribution it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import EvomergeError, shown
from evomerge.merge.recipe import register_recipe_block

if TYPE_CHECKING:  # torch is imported where tokens are made: recipes validate without it
    import torch


class DataSource(BaseModel):
    """Where examples come from: lm-eval task(s) + split, or a jsonl file (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    task: str | list[str] | None = None
    split: Literal["train", "validation", "test"] = "train"
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.task is None) == (self.file is None):
            raise ValueError("give exactly one of task: (lm-eval task name or list) or file: (a jsonl path)")
        if isinstance(self.task, list) and not self.task:
            raise ValueError("task: empty list; name at least one lm-eval task")
        return self

    def tasks(self) -> list[str]:
        return [self.task] if isinstance(self.task, str) else list(self.task or [])


class CalibrationConfig(DataSource):
    """The `calibration:` recipe block."""

    examples: int = Field(default=128, ge=1)
    seq_len: int = Field(default=64, ge=2)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    fisher: Literal["empirical", "sampled"] = "empirical"  # labels: the data's tokens, or drawn from the model
    per_model: dict[str, DataSource] = Field(default_factory=dict)  # model reference -> its own data
    cache_dir: str | None = None  # default: $EVOMERGE_CACHE_DIR or ~/.cache/evomerge

    def source_for(self, reference: str) -> DataSource:
        return self.per_model.get(reference, self)


register_recipe_block("calibration", CalibrationConfig)


@dataclass(frozen=True)
class TokenBatch:
    """Calibration examples as right-padded token ids.

    `attention_mask` marks real tokens; `loss_mask[b, t]` marks positions whose *next* token is a
    target of the log-likelihood (the answer tokens, or every token of a plain-text example).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def fingerprint(self) -> str:
        import torch

        digest = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.loss_mask):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def batches(self, size: int):
        for start in range(0, self.input_ids.shape[0], size):
            yield (
                self.input_ids[start : start + size],
                self.attention_mask[start : start + size],
                self.loss_mask[start : start + size],
            )


def read_examples(source: DataSource, search_dirs: list[Path], where: str) -> list[tuple[str, str]]:
    """(prompt, target) pairs; a plain `text` example is ("", text)."""
    if source.file is not None:
        return _jsonl_examples(_locate(source.file, search_dirs, f"{where}.file"), f"{where}.file")
    out: list[tuple[str, str]] = []
    for name in source.tasks():
        out.extend(_task_examples(name, source.split, f"{where}.task"))
    return out


def _locate(name: str, search_dirs: list[Path], where: str) -> Path:
    path = Path(name)
    try:
        path = path.expanduser()
    except RuntimeError:  # `~name` of no known user: a relative path like any other
        pass
    options = [path] if path.is_absolute() else [path] + [d / path for d in search_dirs]
    for option in options:
        try:
            if option.is_file():
                return option
        except OSError as exc:  # a name too long for the file system
            raise EvomergeError(f"{where}: cannot look for {shown(name)}: {exc.strerror}; check the path") from None
    raise EvomergeError(f"{where}: {name!r} not found (looked in {', '.join(str(o) for o in options)})")


def _jsonl_examples(path: Path, where: str) -> list[tuple[str, str]]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EvomergeError(f"{where}: line {number} of {path} is not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            out.append(("", row["text"]))
            continue
        target = next(
            (
                row.get(k)
                for k in ("answer", "completion", "target")
                if isinstance(row, dict) and isinstance(row.get(k), str)
            ),
            None,
        )
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or target is None:
            raise EvomergeError(
                f"{where}: line {number} of {path} needs a 'text' string, or 'prompt' and "
                "'answer' (or 'completion'/'target') strings"
            )
        out.append((row["prompt"], target))
    if not out:
        raise EvomergeError(f"{where}: {path} has no examples")
    return out


def _task_examples(name: str, split: str, where: str) -> list[tuple[str, str]]:
    from evomerge.io.tasks import build_tasks

    try:
        task = build_tasks([name], split)["tasks"][name]
    except EvomergeError as exc:
        raise EvomergeError(f"{where}: {exc}") from None
    delimiter = getattr(task.config, "target_delimiter", " ") or ""
    out = []
    for doc in task.eval_docs:
        prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if isinstance(target, list):
            target = target[0]
        out.append((str(prompt), delimiter + str(target)))
    return out


def sample_examples(examples: list[tuple[str, str]], count: int, seed: int) -> list[tuple[str, str]]:
    """A seeded subset (in file order) of `count` examples, or all of them when there are fewer."""
    if count >= len(examples):
        return list(examples)
    picks = sorted(random.Random(seed).sample(range(len(examples)), count))
    return [examples[i] for i in picks]


def tokenize(examples: list[tuple[str, str]], tokenizer: Any, seq_len: int) -> TokenBatch:
    """Prompt + target (+ eos for prompt/target pairs), truncated to `seq_len`, right-padded."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    rows, targets = [], []
    for prompt, target in examples:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        if prompt and eos is not None:
            t = t + [eos]
        ids = (p + t)[:seq_len]
        first_target = max(len(p), 1)  # a plain text predicts every token after the first
        rows.append(ids)
        targets.append(first_target)
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    loss = torch.zeros((n, seq_len), dtype=torch.bool)
    for i, (ids, first) in enumerate(zip(rows, targets, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        loss[i, first - 1 : len(ids) - 1] = True  # position t predicts token t + 1
    if not bool(loss.any()):
        raise EvomergeError(
            "calibration.seq_len: every example is truncated before its first target token; raise seq_len"
        )
    return TokenBatch(input_ids, attention, loss)


def calibration_batch(config: CalibrationConfig, reference: str, tokenizer: Any, search_dirs: list[Path]) -> TokenBatch:
    """The token batch that `reference`'s statistics are computed on."""
    source = config.source_for(reference)
    where = f"calibration.per_model[{reference!r}]" if reference in config.per_model else "calibration"
    examples = sample_examples(read_examples(source, search_dirs, where), config.examples, config.seed)
    return tokenize(examples, tokenizer, config.seq_len)


def calibration_of(recipe: Any) -> CalibrationConfig | None:
    block = (recipe.model_extra or {}).get("calibration")
    return block if isinstance(block, CalibrationConfig) else None
