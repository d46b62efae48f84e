"""What the search sends a worker, derived seeds, and the hashes that make evaluations cacheable.

Payload of one candidate (a plain dict, picklable, JSON-able):

    {"recipe": {...},            # the decoded Recipe as mergekit-schema data (recipe_to_dict)
     "seed": 123 | None,         # DARE/DELLA mask seed; equals recipe["seed"] (None: method not random)
     "split": "train",           # which split of every task to score
     "tasks": [{"name": "toy_add", "metric": "exact_match", "weight": 0.5, "limit": 100}, ...],
     "subset_seed": 456,         # seeds the fixed item subset of tasks with a `limit`
     "include_paths": ["/abs/folder"],   # extra lm-eval task folders
     "prompts": {"apply_chat_template": true, ...},   # only when the space sets lm-eval's prompt options
     "window": [0, 50], "order_seed": 789}   # staged evaluation only (see evomerge.search.fidelity)

A worker answers with `EvalResult.success(id, fitness, metrics)`: fitness = sum of weight * metric
over tasks, metrics keyed `"<task>/<metric>"`, plus `"<task>/n"` (items scored) and, when it has
one, `"<task>/<metric>_stderr"`; the report's confidence interval is built from these.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from evomerge.merge.recipe import Recipe, recipe_to_dict
from evomerge.search.space.config import SpaceConfig


def derive_seed(root: int, *labels: Any) -> int:
    """A 31-bit seed from the run's root seed and a purpose label: independent streams, one root."""
    text = "\0".join([str(root), *(str(label) for label in labels)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def recipe_sha(recipe: Recipe) -> str:
    return sha256(recipe_to_dict(recipe))


def eval_config(config: SpaceConfig, split: str, full: bool = False) -> dict[str, Any]:
    """Everything besides the recipe that decides an evaluation's outcome.

    `full` drops the per-task item limits: the search scores a fixed subset (cheap, noisy), while
    the selection and the final report score whole splits.
    """
    tasks = [t.model_dump(mode="json") for t in config.tasks]
    if full:
        tasks = [{**t, "limit": None} for t in tasks]
    out = {
        "split": split,
        "tasks": tasks,
        "subset_seed": derive_seed(config.seed, "data", split),
        "include_paths": list(config.include_paths),
    }
    if config.prompts is not None:  # only when set: cache keys of runs without it stay as they were
        out["prompts"] = config.prompts.model_dump(mode="json")
    return out


def make_payload(
    recipe: Recipe, config: SpaceConfig, split: str, full: bool = False, window: tuple[int, int | None] | None = None
) -> dict[str, Any]:
    """`window` (staged evaluation): score only positions [start, stop) of each task's items in a
    fixed seeded order (`order_seed`), and answer with per-item scores."""
    payload = {"recipe": recipe_to_dict(recipe), "seed": recipe.seed, **eval_config(config, split, full)}
    if window is not None:
        payload.update(window=list(window), order_seed=derive_seed(config.seed, "order", split))
    return payload


def cache_key(payload: dict[str, Any]) -> str:
    """Identical recipe + seed + task config => identical key => evaluated once."""
    return sha256(payload)


def source_recipe(model: str) -> Recipe:
    """A recipe whose merge is exactly `model` (to score a source model through the same worker)."""
    return Recipe.model_validate({"merge_method": "passthrough", "models": [{"model": model}]})
