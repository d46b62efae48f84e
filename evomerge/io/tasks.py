"""Reading lm-eval task data: the task YAMLs of our tasks/ folder (and user folders) built into
lm-eval task objects that show one split, offline.

The lowest part that needs task data is the merge core (calibration examples of data-aware
methods), so this lives in `io`; `evomerge.scoring.lm_tasks` adds the caches scoring needs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.io.paths import tasks_dir

SPLITS = ("train", "validation", "test")
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed: the sampler seed `simple_evaluate` sets


def quiet_offline_env() -> None:
    """No hub access at run time, and no progress-bar noise from the HF libraries."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def task_manager(include_paths: Sequence[Path] = ()):
    """A TaskManager over our tasks/ folder (+ user folders), without lm-eval's 17 s default index."""
    from lm_eval.tasks import TaskManager

    paths = [str(tasks_dir())] + [str(Path(p).resolve()) for p in include_paths]
    return TaskManager(include_path=paths, include_defaults=False)


def check_tasks(specs: Sequence[tuple[str, str]], include_paths: Sequence[Path] = ()) -> None:
    """Each (task, metric) of a search space exists and reports that metric, read from the task
    index alone (no data loaded): checked before a run directory is made, so a typo is one line
    and not a run whose every candidate fails in the worker."""
    quiet_offline_env()
    index = task_manager(include_paths).task_index
    for i, (name, metric) in enumerate(specs):
        entry = index.get(name)
        if entry is None:
            known = ", ".join(sorted(index)) or "none"
            raise EvomergeError(
                f"tasks[{i}].name: unknown lm-eval task {name!r}; known here: {known} "
                "(add the folder of its YAML to include_paths)"
            )
        config = getattr(entry, "cfg", None) or {}
        reported = [m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, dict)]
        if reported and metric not in reported:
            raise EvomergeError(
                f"tasks[{i}].metric: task {name} reports {', '.join(map(str, reported))}, not {metric!r}"
            )


def build_tasks(names: Sequence[str], split: str = "test", include_paths: Sequence[Path] = ()) -> dict[str, Any]:
    """lm-eval's task dict of the named tasks, each showing `split` (as `eval_docs`), with the
    few-shot count of its YAML (`num_fewshot`, default 0) and lm-eval's default few-shot seed, as
    `lm_eval --tasks NAME` runs it.

    Relative `data_files` in a task YAML are resolved against the YAML's own folder, so task folders
    work from any working directory (lm-eval itself resolves them against the CWD).
    """
    quiet_offline_env()
    if split not in SPLITS:
        raise EvomergeError(f"split: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    manager = task_manager(include_paths)
    merged: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            raise EvomergeError(
                f"tasks: unknown lm-eval task {name!r}; known here: {', '.join(manager.all_subtasks) or 'none'}"
                " (add a folder of task YAMLs with --include-path)"
            )
        folder = Path(entry.yaml_path).parent if entry.yaml_path else Path.cwd()
        with _cwd(folder):
            loaded = manager.load([name])
        for key in merged:
            merged[key].update(loaded[key])
    for name, task in merged["tasks"].items():
        _select_split(task, name, split)
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return merged


def _select_split(task: Any, name: str, split: str) -> None:
    """Make lm-eval's eval_docs (which prefers test_split) return `split`."""
    configured = getattr(task.config, SPLIT_KEYS[split])
    if configured is None or configured not in task.dataset:
        raise EvomergeError(f"split: task {name!r} has no {split} split; its YAML must set {SPLIT_KEYS[split]}")
    task.set_config(key="test_split", value=configured)
