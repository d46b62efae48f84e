"""`evomerge eval`: score one model directory on lm-eval tasks and print a table or JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from evomerge.io.model_loading import check_model_dir, load_model_and_tokenizer
from evomerge.scoring.lm_tasks import load_tasks, make_lm, metric_values, score_tasks, task_samples


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
) -> dict:
    """`subset_seed` picks the same seeded item subsets as a search worker (else the first `limit`)."""
    check_model_dir(model_dir)  # before the slow imports
    started = time.perf_counter()
    loaded = load_tasks(tasks, split=split, include_paths=include_paths)
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device)
    lm = make_lm(model, tokenizer, batch_size=batch_size, device=device)
    samples = task_samples(loaded, dict.fromkeys(loaded.names, limit), subset_seed) if limit else None
    metrics = metric_values(score_tasks(lm, loaded, samples=samples))
    report = {
        "model": str(model_dir),
        "split": split,
        "limit": limit,
        "subset_seed": subset_seed,
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
