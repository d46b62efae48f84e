"""`evomerge eval`: score one model directory on lm-eval tasks and print a table or JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.io.model_loading import check_model_dir, load_model_and_tokenizer
from evomerge.scoring.lm_tasks import PromptOptions, load_tasks, make_lm, metric_values, score_tasks, task_samples


def prompt_options(
    apply_chat_template: bool, fewshot_as_multiturn: bool, single_turn: bool, system_instruction: str | None
) -> PromptOptions:
    """The eval command's prompt flags, checked as lm-eval checks them (one line naming the flag).
    Neither multiturn flag: lm-eval's default (few-shot turns iff a chat template is applied)."""
    if fewshot_as_multiturn and single_turn:
        raise EvomergeError("--fewshot-as-multiturn: give it or --no-fewshot-as-multiturn, not both")
    if fewshot_as_multiturn and not apply_chat_template:
        raise EvomergeError("--fewshot-as-multiturn: needs --apply-chat-template (few-shot turns are chat messages)")
    return PromptOptions(
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=True if fewshot_as_multiturn else (False if single_turn else None),
        system_instruction=system_instruction,
    )


def score_model_dir(
    model_dir: Path,
    tasks: Sequence[str],
    limit: int | None = None,
    split: str = "test",
    include_paths: Sequence[Path] = (),
    batch_size: int = 64,
    device: str = "cpu",
    subset_seed: int | None = None,
    prompts: PromptOptions | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's result dict for a model directory. The model is loaded as `lm_eval --model hf`
    loads it (`dtype=auto`: the dtype it was saved in), so a bf16 export scores as lm-eval scores it."""
    check_model_dir(model_dir)  # before the slow imports
    loaded = load_tasks(tasks, split=split, include_paths=include_paths)
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device, dtype="auto")
    lm = make_lm(model, tokenizer, batch_size=batch_size, device=device)
    samples = task_samples(loaded, dict.fromkeys(loaded.names, limit), subset_seed) if limit else None
    return score_tasks(lm, loaded, samples=samples, log_samples=log_samples, prompts=prompts)


def run_eval(
    model_dir: Path,
    tasks: Sequence[str],
    limit: int | None = None,
    split: str = "test",
    include_paths: Sequence[Path] = (),
    batch_size: int = 64,
    device: str = "cpu",
    as_json: bool = False,
    subset_seed: int | None = None,
    prompts: PromptOptions | None = None,
) -> dict:
    """`subset_seed` picks the same seeded item subsets as a search worker (else the first `limit`);
    `prompts`: lm-eval's chat template, few-shot turns and system instruction options."""
    check_model_dir(model_dir)  # before the slow imports
    started = time.perf_counter()
    results = score_model_dir(
        model_dir, tasks, limit, split, include_paths, batch_size, device, subset_seed, prompts=prompts
    )
    metrics = metric_values(results)
    report = {
        "model": str(model_dir),
        "split": split,
        "limit": limit,
        "subset_seed": subset_seed,
        "prompts": (prompts or PromptOptions()).model_dump(mode="json"),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{model_dir} ({split} split{f', first {limit}' if limit else ''})")
        table.add_column("task")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for task, values in metrics.items():
            for metric, value in values.items():
                table.add_row(task, metric, f"{value:.4f}")
        Console().print(table)
    return report
