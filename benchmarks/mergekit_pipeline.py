"""mergekit-evolve's `serial` strategy, rebuilt on a CPU from mergekit's and lm-eval's public calls.

mergekit-evolve 0.1.5 cannot run on a CPU-only machine (../shared/reference/mergekit_evolve_cpu.md):
its import fails against lm-eval >= 0.4.10, every Ray request asks for a GPU, and each strategy
then crashes or hangs. What its `serial` strategy does per candidate is small, so it is rebuilt
here with the same library calls and the same defaults:

1. decode: `ModelGenome.genotype_merge_config(x)` (dare_ties, `layer_granularity` layers per
   group, `dtype: bfloat16`, `int8_mask: true` as the genome writes them);
2. merge: `mergekit.merge.run_merge` into `tempfile.mkdtemp(prefix="merged")` with the
   `MergeOptions` mergekit-evolve builds under `--no-merge-cuda` (one output shard, quiet,
   `random_seed` = the run seed, so every merge reseeds the DARE masks the same way);
3. score: `lm_eval.simple_evaluate(model="hf", model_args={pretrained: dir, dtype: bfloat16,
   use_cache: True})` with a `TaskManager` over a folder of task YAMLs, then the folder is deleted;
4. drive: `cma.fmin2(None, parallel_objective=..., x0=initial_genotype(), sigma0=1/6,
   options={"maxfevals": budget})`, pycma's default population 4 + floor(3 ln N), no bounds,
   and fmin2's closing evaluation of the final mean; the final choice is the best genotype
   evaluated (mergekit-evolve's `best_config.yaml`).

Deviations, each needed on a CPU or for a fair, reproducible benchmark (none helps evomerge):
`device="cpu"` is passed to lm-eval (mergekit leaves HFLM on its CUDA default, blocker 5);
everything runs in one process without Ray (the serial strategy runs one candidate at a time in
one Ray task per genotype anyway); pycma gets its own seeded RNG (mergekit-evolve ignores its
seed, and `simple_evaluate` reseeds numpy's global RNG every call, which would freeze an ES that
draws from it); the tasks' item subset is passed as lm-eval `samples` (mergekit passes `limit`,
the first N items) so both systems see the same items; `batch_size` is passed (mergekit-evolve's
default leaves lm-eval at 1); `apply_chat_template` is off (the toy tokenizer has none); models are
not resharded (`--no-reshard`); lm-eval's built-in task index is not built (saves 17 s per run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SIGMA0 = 1 / 6  # mergekit-evolve's --sigma0 default
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


@dataclass(frozen=True)
class FitnessTask:
    """One fitness term: weight * metric of an lm-eval task (mergekit-evolve's TaskConfiguration)."""

    name: str
    metric: str = "exact_match,none"
    weight: float = 1.0


def split_task_folder(task_yamls: Sequence[Path], split: str, out: Path) -> Path:
    """Task YAMLs that score `split`, with absolute data files: what a mergekit-evolve user writes
    for `--task-search-path` (lm-eval scores `test_split` and resolves data files against the CWD)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in task_yamls:
        config = yaml.safe_load(Path(path).read_text())
        folder = Path(path).resolve().parent
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {key: str(folder / value) for key, value in files.items()}
        config["test_split"] = config[SPLIT_KEYS[split]]
        (out / Path(path).name).write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def merge_options(seed: int) -> Any:
    """The MergeOptions mergekit-evolve builds with --no-merge-cuda (scripts/evolve.py)."""
    from mergekit.options import MergeOptions

    return MergeOptions(
        cuda=False,
        low_cpu_memory=False,
        read_to_gpu=False,
        out_shard_size=1_000_000_000_000,
        random_seed=seed,
        quiet=True,
        copy_tokenizer=True,
        safe_serialization=True,
    )


def make_genome(
    models: Sequence[str],
    base_model: str,
    *,
    layer_granularity: int = 1,
    merge_method: str = "dare_ties",
    normalize: bool | None = None,
) -> Any:
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    definition = ModelGenomeDefinition(
        models=list(models),
        base_model=base_model,
        merge_method=merge_method,
        layer_granularity=layer_granularity,
        normalize=normalize,
    )
    return ModelGenome(definition)


@dataclass
class SerialPipeline:
    """Decode, merge to a temporary directory, score with `simple_evaluate`, delete: one candidate.

    `dtype` None keeps the genome's bfloat16 (merge and evaluation, as mergekit-evolve does);
    "float32" is for comparing scores with evomerge's float32 worker."""

    genome: Any
    tasks: Sequence[FitnessTask]
    task_folder: Path
    storage: Path
    seed: int = 0
    batch_size: int | None = 64
    dtype: str | None = None
    _task_manager: Any = field(default=None, init=False, repr=False)

    def merge(self, genotype: np.ndarray) -> Path:
        from mergekit.merge import run_merge

        config = self.genome.genotype_merge_config(genotype)
        if self.dtype is not None:
            config = config.model_copy(update={"dtype": self.dtype})
        self.storage.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="merged", dir=self.storage))
        run_merge(config, out_path=str(out), options=merge_options(self.seed))
        return out

    def score(self, model_dir: Path, samples: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
        """Weighted fitness of a model directory, then the directory is deleted (as mergekit does)."""
        import lm_eval

        try:
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir), "dtype": self.dtype or "bfloat16", "use_cache": True},
                tasks=sorted({t.name for t in self.tasks}),
                task_manager=self.task_manager(),
                device="cpu",
                batch_size=self.batch_size,
                samples=dict(samples) if samples else None,
                log_samples=False,
                verbosity="ERROR",
                apply_chat_template=False,
                fewshot_as_multiturn=False,
            )
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
        per_task = results["results"]
        score = sum(per_task[t.name][t.metric] * t.weight for t in self.tasks)
        metrics = {t.name: float(per_task[t.name][t.metric]) for t in self.tasks}
        return {"score": float(score), "metrics": metrics}

    def evaluate(self, genotype: np.ndarray, samples: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
        return self.score(self.merge(genotype), samples)

    def task_manager(self) -> Any:
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            self._task_manager = TaskManager(include_path=str(self.task_folder), include_defaults=False)
        return self._task_manager


@dataclass
class SearchLog:
    """What the benchmark reads back: every evaluation's score and time, and the best genotype."""

    scores: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_score: float = float("-inf")
    best_genotype: np.ndarray | None = None


def cma_search(
    pipeline: SerialPipeline, budget: int, seed: int, samples: Mapping[str, list[int]] | None = None
) -> tuple[SearchLog, Any]:
    """`cma.fmin2` as mergekit-evolve calls it (x0, sigma0 1/6, default popsize, maxfevals), with
    pycma on a private seeded RNG. An evaluation that raises ends the search, as in mergekit-evolve."""
    import cma

    log = SearchLog()

    def objective(genotypes: list[np.ndarray]) -> list[float]:
        costs = []
        for genotype in genotypes:
            started = time.perf_counter()
            result = pipeline.evaluate(genotype, samples)
            log.seconds.append(time.perf_counter() - started)
            log.scores.append(result["score"])
            if result["score"] > log.best_score:
                log.best_score, log.best_genotype = result["score"], np.array(genotype, dtype=float)
            costs.append(-result["score"])
        return costs

    x0 = pipeline.genome.initial_genotype(random=False).view(-1).numpy()
    options = {"maxfevals": budget, "seed": seed, "randn": np.random.RandomState(seed).randn, "verbose": -9}
    _, es = cma.fmin2(None, x0=x0, sigma0=SIGMA0, options=options, parallel_objective=objective)
    return log, es


def quiet_env() -> None:
    """Offline, no progress bars: set before lm-eval and transformers are imported."""
    for key in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "TQDM_DISABLE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
