"""The search-space YAML as typed objects, validated with one-line errors that name the field.

A search space says what may vary (PS genes, DFS path), what fitness is (lm-eval tasks and
weights), which split each phase scores, and the budget. It holds no model data: model layer
counts are read from config.json when the space is bound (`evomerge.search.space.SearchSpace`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError, shown
from evomerge.io.yaml_files import parse_yaml, read_text
from evomerge.merge.recipe import TokenizerConfig
from evomerge.scoring.lm_tasks import PromptOptions

PS_METHODS = (
    "ties",
    "dare_ties",
    "task_arithmetic",
    "linear",
    "della",
    "breadcrumbs",
    "dare_linear",
    "della_linear",
    "breadcrumbs_ties",
    "fisher",
    "regmean",
    "rebasin",
    "repair",
    "nuslerp",
    "multislerp",
)
# methods that can merge the listed models without a base (nuslerp and multislerp use one when it is set)
BASELESS_PS_METHODS = ("linear", "fisher", "regmean", "nuslerp", "multislerp")
DEFAULT_WORKER = "evomerge.workers.fitness:FitnessWorker"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN weight or range is a typo, not a value


class TaskSpec(_Strict):
    """One lm-eval task in the fitness: fitness = sum of weight * metric over tasks."""

    name: str = Field(min_length=1)
    metric: str = "exact_match"
    weight: float = 1.0
    limit: int | None = Field(default=None, ge=1)  # items per evaluation (a fixed seeded subset)


class Splits(_Strict):
    """Which split the search optimizes, which chooses the final recipe, which is reported once."""

    search: Literal["train", "validation", "test"] = "train"
    select: Literal["train", "validation", "test"] = "validation"
    report: Literal["train", "validation", "test"] = "test"

    @model_validator(mode="after")
    def _report_held_out(self) -> Splits:
        if self.report in (self.search, self.select):
            raise ValueError(
                f"splits.report: {self.report!r} is also searched or used for selection; "
                "report on a held-out split (e.g. test)"
            )
        return self


class Budget(_Strict):
    max_evals: int = Field(default=200, ge=1)
    # None: 4 + floor(3 ln n_genes), as in the paper; a generation is held in memory, hence the cap
    popsize: int | None = Field(default=None, ge=2, le=10_000)
    sigma0: float = Field(default=1 / 6, ge=1e-6, le=1)  # fraction of each gene's range (smaller stalls CMA-ES)
    select_top_k: int = Field(default=5, ge=1)  # re-scored on the selection split at the end

    @model_validator(mode="after")
    def _generation_fits(self) -> Budget:
        if self.popsize is not None and self.popsize > self.max_evals:
            raise ValueError(
                f"popsize {self.popsize} is more than max_evals {self.max_evals}: a generation must fit in "
                "the budget; lower popsize or raise max_evals"
            )
        return self


OPTUNA_SAMPLERS = ("tpe", "cmaes", "nsga2")


class OptimizerSpec(_Strict):
    name: Literal["cma", "random", "optuna"] = "cma"  # random: uniform in the bounds (the baseline)
    sampler: Literal["tpe", "cmaes", "nsga2"] | None = None  # optuna only (default tpe)
    options: dict[str, Any] = Field(default_factory=dict)  # pycma options, or the optuna sampler's kwargs

    @model_validator(mode="after")
    def _sampler_for_optuna(self) -> OptimizerSpec:
        if self.sampler is not None and self.name != "optuna":
            raise ValueError(f"a sampler is for the optuna optimizer only (got name {self.name!r})")
        if self.name == "optuna" and self.sampler is None:
            self.sampler = "tpe"
        return self


class ObjectiveSpec(_Strict):
    """One objective of a multi-objective run: a task's metric on the search split, or a measure
    of the decoded recipe (`size`: parameters of the merged model; `path_length`: DFS layers)."""

    task: str | None = None
    metric: str | None = None  # default: the task's fitness metric
    measure: Literal["size", "path_length"] | None = None
    direction: Literal["maximize", "minimize"] | None = None  # default: maximize metrics, minimize measures

    @model_validator(mode="after")
    def _task_or_measure(self) -> ObjectiveSpec:
        if (self.task is None) == (self.measure is None):
            raise ValueError("give exactly one of task (a metric) or measure (size, path_length)")
        if self.metric is not None and self.task is None:
            raise ValueError("metric: only a task objective has a metric")
        return self


class FidelityConfig(_Strict):
    """Staged evaluation: score each candidate on growing item prefixes (per task) and stop it once
    its upper confidence bound falls below the population's best lower bound."""

    stages: list[int] = Field(min_length=1)  # items per task before the full evaluation, ascending
    z: float = Field(default=1.96, gt=0)  # confidence bounds are estimate +- z * standard error
    rank: int = Field(default=1, ge=1)  # race against the rank-th best lower bound of the generation

    @field_validator("stages")
    @classmethod
    def _ascending(cls, value: list[int]) -> list[int]:
        if any(n < 2 for n in value) or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(
                f"must be ascending item counts >= 2 (got {value}); the full evaluation is always the last stage"
            )
        return value


class WorkerConfig(_Strict):
    """How workers are built: `factory` is 'package.module:attr', called with `kwargs` plus the
    sources, tasks and include paths of the space (see evomerge.search.driver.worker_spec)."""

    factory: str = DEFAULT_WORKER
    kwargs: dict[str, Any] = Field(default_factory=dict)
    penalty: float = 0.0  # fitness of a failed evaluation
    timeout: float | None = Field(default=None, gt=0, le=366 * 86400)  # seconds per candidate (at most a year)

    @field_validator("kwargs")
    @classmethod
    def _memory_settings(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`memory_budget` and `cache` (docs/memory.md) fail when the space loads, not in a worker."""
        from evomerge.candidates.budget import cache_mode, parse_budget

        try:
            budget = parse_budget(kwargs.get("memory_budget"), "memory_budget")
            cache_mode(kwargs.get("cache"), budget)
        except EvomergeError as exc:
            raise ValueError(str(exc)) from None
        return kwargs


Bounds = tuple[float, float]


def _check_span(where: str, low: float, high: float) -> None:
    """Bounds whose width overflows (e.g. [-1e308, 1e308]) make every step of the optimizer NaN."""
    if not math.isfinite(high - low):
        raise ValueError(f"{where}bounds [{low}, {high}] are too far apart to search; narrow them")


class PSConfig(_Strict):
    """Parameter-space merging: one value per source model per layer group for each gene kind."""

    method: str = "dare_ties"
    granularity: Literal["whole", "layer"] | int = "whole"  # an int k: blocks of k layers
    split_attn_mlp: bool = False  # separate genes for attention and MLP tensors
    embedding_genes: bool = False  # separate groups for embeddings (pre) and final norm / head (post)
    genes: dict[str, Bounds] | None = None  # gene kind -> bounds; default: weight and density in [0, 1]
    x0: dict[str, float] = Field(default_factory=dict)  # gene kind -> start value (default: mid-range)
    parameters: dict[str, Any] = Field(default_factory=dict)  # fixed global method parameters
    calibration: dict[str, Any] | None = None  # the recipe's calibration: block (fisher, regmean, repair)
    mask_seed: Literal["run", "candidate"] = "run"  # one DARE/DELLA mask seed per run, or per candidate
    decimals: int = Field(default=6, ge=1, le=12)  # values are rounded so recipes read well and dedupe

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in PS_METHODS:
            raise ValueError(f"unknown PS method {value!r} (use one of {', '.join(PS_METHODS)})")
        return value

    @field_validator("granularity")
    @classmethod
    def _positive_block(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"block size must be >= 1 (got {value}); or use 'whole' / 'layer'")
        return value

    @field_validator("genes")
    @classmethod
    def _ordered_bounds(cls, value: dict[str, Bounds] | None) -> dict[str, Bounds] | None:
        for kind, (low, high) in (value or {}).items():
            if not low < high:
                raise ValueError(f"{kind}: bounds must be [low, high] with low < high (got [{low}, {high}])")
            _check_span(f"{kind}: ", low, high)
        return value


class DFSConfig(_Strict):
    """Data-flow-space merging: which layers of which models the path takes, and transition scales."""

    models: list[str] | None = None  # the DFS sources in layout order; default: the space's models
    repeats: int = Field(default=3, ge=1, le=100)  # r: the layout is repeated r times (the paper: 3)
    anchor: str | None = None  # supplies embeddings, first and last layer; default: the first DFS model
    anchor_layers: bool = True  # fix the anchor's first and last layers as the path's ends (the paper)
    max_path_length: int | None = Field(default=None, ge=1)
    scales: Literal["layer_pair", "model_pair"] = "layer_pair"  # W_ij per layer pair, or per model pair
    scale_bounds: Bounds = (0.5, 2.0)
    indicator_bounds: Bounds = (-1.0, 1.0)
    indicator_on: float | None = None  # x0 of the anchor's first-repeat slots; default 2 sigma (paper)
    indicator_off: float = 0.0  # x0 of every other slot (paper: 0)

    @field_validator("scale_bounds")
    @classmethod
    def _positive_scales(cls, value: Bounds) -> Bounds:
        low, high = value
        if not 0 < low < high:
            raise ValueError(
                f"must be [low, high] with 0 < low < high (got [{low}, {high}]): the scale "
                "fold into output projections is exact only for positive scales"
            )
        _check_span("", low, high)
        return value

    @field_validator("indicator_bounds")
    @classmethod
    def _straddles_zero(cls, value: Bounds) -> Bounds:
        low, high = value
        if not low < 0 < high:
            raise ValueError(
                f"must be [low, high] with low < 0 < high (got [{low}, {high}]): a slot is used iff its gene is > 0"
            )
        _check_span("", low, high)
        return value


class ZooRef(_Strict):
    """The toy zoo the space's models live in (`path`, relative to the space file): a search first
    verifies it against its SHA256SUMS (`evomerge.zoo.models.verify_zoo`); nothing is built on the fly.
    `seed` and `mini`, when given, must be what the zoo was built with."""

    path: str
    seed: int | None = Field(default=None, ge=0)
    mini: bool | None = None

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("a path cannot hold a NUL character")
        return value


class SpaceConfig(_Strict):
    """The whole search-space file."""

    name: str | None = None
    zoo: ZooRef | None = None  # the demo spaces: their models live in the shipped, checksummed zoo
    models: list[str] = Field(min_length=1)
    base_model: str | None = None
    tasks: list[TaskSpec] = Field(min_length=1)
    # lm-eval's prompt options for every task: apply_chat_template, fewshot_as_multiturn, system_instruction
    prompts: PromptOptions | None = None
    include_paths: list[str] = Field(default_factory=list)
    splits: Splits = Field(default_factory=Splits)
    budget: Budget = Field(default_factory=Budget)
    seed: int = Field(default=0, ge=0)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    objectives: list[ObjectiveSpec] = Field(default_factory=list)  # 2+: a Pareto front is kept
    fidelity: FidelityConfig | None = None
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    ps: PSConfig | None = None
    dfs: DFSConfig | None = None
    # mergekit's tokenizer: block, copied into every recipe: sources whose vocabularies differ are
    # aligned by token (evomerge.merge.vocabulary), and exported recipes carry the block.
    tokenizer: TokenizerConfig | None = None

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_name(cls, value: Any) -> Any:
        if isinstance(value, str):  # "cma", or "optuna:nsga2" (the --optimizer form)
            name, _, sampler = value.partition(":")
            return {"name": name, "sampler": sampler} if sampler else {"name": name}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceConfig:
        if self.ps is None and self.dfs is None:
            raise ValueError("ps/dfs: give a `ps:` block, a `dfs:` block, or both")
        if self.ps is not None and self.ps.method not in BASELESS_PS_METHODS and not self.base_model:
            raise ValueError(f"base_model: PS method {self.ps.method} needs a base model")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("tasks: each task may appear once")
        for i, objective in enumerate(self.objectives):
            if objective.task is not None and objective.task not in names:
                raise ValueError(f"objectives[{i}].task: {objective.task!r} is not one of tasks ({', '.join(names)})")
            if objective.measure == "path_length" and self.dfs is None:
                raise ValueError(f"objectives[{i}].measure: path_length needs a dfs: block")
        if len(self.objectives) == 1:
            raise ValueError("objectives: list two or more (one objective is the fitness)")
        if self.optimizer.sampler == "nsga2" and not self.objectives:
            raise ValueError("optimizer.sampler: nsga2 searches several objectives; list them in objectives")
        if self.dfs is not None and self.dfs.anchor is not None:
            dfs_models = self.dfs.models or self.models
            if self.ps is None and self.dfs.anchor not in dfs_models:
                raise ValueError(
                    f"dfs.anchor: {self.dfs.anchor!r} is not one of the DFS models ({', '.join(dfs_models)})"
                )
        return self

    @property
    def kind(self) -> str:
        return "ps+dfs" if self.ps and self.dfs else ("ps" if self.ps else "dfs")


# -- loading --------------------------------------------------------------------------------------


def _format_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    path = ""
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in {"int", "str", "literal", "function-after"}):
            continue
        else:
            path += ("." if path else "") + str(part)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if first["type"] == "missing":
        return f"{path}: required field is missing"
    if first["type"].startswith("value_error") or first["type"] == "assertion_error":
        return f"{path}: {msg}" if path else msg
    return f"{path or 'space'}: {msg} (got {shown(first.get('input'))})"


def parse_space(data: Any, source: str = "search space") -> SpaceConfig:
    if not isinstance(data, Mapping):
        raise EvomergeError(f"{source}: expected a mapping with models, tasks and ps/dfs")
    try:
        return SpaceConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise EvomergeError(f"{_format_error(exc)} (in {source})") from None


def load_space_config(path: str | Path) -> SpaceConfig:
    """Read a search-space YAML safely; relative model paths stay relative (bound later)."""
    path = Path(path)
    return parse_space(parse_yaml(read_text(path, "search space"), str(path)), source=str(path))


def dump_space_config(config: SpaceConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
