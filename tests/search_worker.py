"""A small but real fitness worker for driver tests, and tiny model directories for spaces to bind to.

`ToyFitnessWorker` takes the search's payload exactly as the lm-eval worker will (recipe dict, seed,
split, tasks, subset seed) and answers in the same shape: fitness = sum of weight * metric, metrics
keyed `task/metric` plus `task/n`. Each metric is a smooth function of the recipe's numbers computed
with torch (a per-task, per-split target the recipe is scored against), so CMA-ES has something to
climb and a different split gives a different, correlated score.

It also behaves like the real thing where it matters for the driver: it reseeds numpy's global RNG
on every call (as lm-eval's simple_evaluate does), it can be slowed down (env
EVOMERGE_TEST_WORKER_DELAY, seconds) or made to hang on one evaluation (env
EVOMERGE_TEST_WORKER_HANG_AT, an eval id: it logs the call, then sleeps) so a test can kill the
search at a known point mid-generation, it fails on request (`fail_above`: a weight above this
raises), and it logs every evaluation it really runs (`log`: a file; one JSON line per call) so
tests can prove nothing was recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fake_models import fake_llama

from evomerge.workers.candidate import Candidate, EvalResult


def _numbers(data: Any) -> list[float]:
    """Every float in a recipe dict, in a fixed order (keys sorted)."""
    if isinstance(data, bool):
        return []
    if isinstance(data, float):  # parameter values; layer ranges (ints) are layout, not knobs
        return [data]
    if isinstance(data, dict):
        return [x for key in sorted(data) if key != "seed" for x in _numbers(data[key])]
    if isinstance(data, list):
        return [x for item in data for x in _numbers(item)]
    return []


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


class ToyFitnessWorker:
    def __init__(
        self,
        sources: list[str],
        tasks: list[dict],
        include_paths: list[str] | None = None,
        log: str | None = None,
        fail_above: float | None = None,
    ):
        torch.set_num_threads(1)
        self.sources = list(sources)
        self.task_names = [t["name"] for t in tasks]
        self.log = log
        self.fail_above = fail_above
        self.delay = float(os.environ.get("EVOMERGE_TEST_WORKER_DELAY", "0"))

    def _metric(self, values: torch.Tensor, task: str, split: str, seed: int | None) -> float:
        generator = torch.Generator().manual_seed(_seed(task, values.numel()))
        target = torch.rand(values.numel(), generator=generator, dtype=torch.float64)
        shift = torch.Generator().manual_seed(_seed(task, split))
        target = target + 0.05 * torch.randn(values.numel(), generator=shift, dtype=torch.float64)
        if seed is not None:  # a DARE mask seed changes the merge a little
            target = target + 0.01 * torch.randn(
                values.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            )
        distance = torch.mean((values - target) ** 2)
        return float(torch.exp(-4.0 * distance))

    def evaluate(self, candidate: Candidate) -> EvalResult:
        np.random.seed(1234)  # what lm-eval's simple_evaluate does to the global RNG on every call
        payload = candidate.payload
        recipe = payload["recipe"]
        if self.log:
            with open(self.log, "a", encoding="utf-8") as handle:
                entry = {"eval_id": candidate.id, "pid": os.getpid(), "split": payload["split"], "node": _ray_node()}
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
        _hang_if_asked(candidate)
        if self.delay:
            time.sleep(self.delay)
        for model in _models(recipe):
            if model not in self.sources:
                raise RuntimeError(f"recipe references {model}, which this worker did not load")
        weights = [float(w) for w in _weights(recipe)]
        if self.fail_above is not None and any(w > self.fail_above for w in weights):
            raise RuntimeError(f"weight above {self.fail_above}: merged model diverged")
        values = torch.tensor(_numbers(recipe) or [0.0], dtype=torch.float64)
        if payload.get("window") is not None:
            return self._window(candidate, values)
        metrics: dict[str, float] = {}
        fitness = 0.0
        for task in payload["tasks"]:
            value = self._metric(values, task["name"], payload["split"], payload["seed"])
            metrics[f"{task['name']}/{task['metric']}"] = value
            metrics[f"{task['name']}/n"] = float(task.get("limit") or 200)
            fitness += task["weight"] * value
        return EvalResult.success(candidate.id, fitness, metrics)

    def _window(self, candidate: Candidate, values: torch.Tensor) -> EvalResult:
        """Staged evaluation: item i of a task is solved iff the smooth metric p beats the item's fixed
        difficulty, so the mean over all N = limit (default 200) items is close to p."""
        from evomerge.scoring.lm_tasks import task_seed, window_items

        payload = candidate.payload
        metrics: dict[str, float] = {}
        items: dict[str, list[list[float]]] = {}
        fitness = 0.0
        for task in payload["tasks"]:
            name, total = task["name"], int(task.get("limit") or 200)
            p = self._metric(values, name, payload["split"], payload["seed"])
            difficulty = np.random.RandomState(_seed(name, payload["split"], "items")).uniform(size=total)
            chosen = window_items(range(total), payload["window"], task_seed(payload["order_seed"], name))
            items[name] = sorted([i, float(p > difficulty[i])] for i in chosen)
            mean = sum(s for _, s in items[name]) / len(chosen) if chosen else 0.0
            metrics.update(
                {f"{name}/{task['metric']}": mean, f"{name}/n": float(len(chosen)), f"{name}/n_full": float(total)}
            )
            fitness += task["weight"] * mean
        return EvalResult.success(candidate.id, fitness, metrics, items=items)


def _ray_node() -> str | None:
    """The Ray node this worker runs on (None outside Ray), so tests can see where work went."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _hang_if_asked(candidate: Candidate) -> None:
    if candidate.id == os.environ.get("EVOMERGE_TEST_WORKER_HANG_AT"):
        time.sleep(3600)  # until the test kills the search
    node_file = os.environ.get("EVOMERGE_TEST_WORKER_HANG_ON_NODE_FILE")  # hang on the Ray node named there
    if node_file and Path(node_file).exists() and Path(node_file).read_text().strip() == _ray_node():
        time.sleep(3600)  # until the test removes that node


def hanging_fitness_worker(**kwargs: Any) -> Any:
    """The real fitness worker (real merges, lm-eval) with the toy worker's hang hook, for kill tests
    (imported on use: the toy tests need not load lm-eval)."""
    from evomerge.workers.fitness import FitnessWorker

    class HangingFitnessWorker(FitnessWorker):
        def evaluate(self, candidate: Candidate) -> EvalResult:
            _hang_if_asked(candidate)
            return super().evaluate(candidate)

    return HangingFitnessWorker(**kwargs)


def _models(recipe: dict) -> list[str]:
    out = [recipe["base_model"]] if recipe.get("base_model") else []
    out += [m["model"] for m in recipe.get("models") or []]
    out += [s["model"] for sl in recipe.get("slices") or [] for s in sl["sources"]]
    return out


def _weights(recipe: dict) -> list[float]:
    sources = list(recipe.get("models") or []) + [s for sl in recipe.get("slices") or [] for s in sl["sources"]]
    out = []
    for source in sources:
        weight = (source.get("parameters") or {}).get("weight")
        if isinstance(weight, list):
            out += [entry["value"] for entry in weight]
        elif weight is not None:
            out.append(weight)
    return out


# -- tiny model directories (headers and configs are all a space needs to bind) ---------------------


def make_models(root: Path, layers: int = 4) -> dict[str, Path]:
    """A base and two 'fine-tunes' (different random tensors; only shapes matter to a space)."""
    return {name: fake_llama(root / name, layers, seed=i) for i, name in enumerate(["base", "a", "b"])}


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class ProgressBarProbe:
    """Answers, from inside its own process, whether tqdm, transformers (huggingface_hub) and datasets
    would draw progress bars there: 1.0 per library whose bars are off."""

    def __init__(self, **_: Any):
        pass

    def evaluate(self, candidate: Candidate) -> EvalResult:
        import datasets
        import tqdm
        from huggingface_hub.utils import are_progress_bars_disabled

        with tqdm.tqdm(range(1)) as bar:
            tqdm_off = bar.disable
        metrics = {
            "tqdm": float(tqdm_off),
            "huggingface_hub": float(are_progress_bars_disabled()),
            "datasets": float(not datasets.is_progress_bar_enabled()),
        }
        return EvalResult.success(candidate.id, sum(metrics.values()), metrics)


class UnbuildableWorker:
    """Imports and takes its arguments, then fails to build (a missing GPU, a model that does not
    load): an error only the run itself can meet."""

    def __init__(self, **kwargs: Any):
        raise RuntimeError("no device for this worker")
