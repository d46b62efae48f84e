"""Merge recipes: mergekit's YAML schema as typed objects, with evaluation of parameter settings.

A recipe is what a genome decodes to, what a worker materializes, what the journal records and
what `evomerge merge` reads, so it must round-trip exactly: `load -> dump -> load` gives an equal
object. Method-aware checks (known parameters, bounds, base model) live in `evomerge.merge.validation`;
this module only knows the shape of the YAML.

Later features add top-level blocks (for example `calibration:` for data-aware methods) with
`register_recipe_block`; unknown top-level keys are errors so that typos never pass silently.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError, shown
from evomerge.io.yaml_files import parse_yaml, read_text

Scalar = bool | int | float | str
"""A parameter value; strings are accepted because YAML reads `1e-3` as a string."""


class FilteredValue(BaseModel):
    """One entry of a filtered list: applies when `filter` is a substring of the tensor name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: Scalar | list[Scalar]


ParameterSetting = Scalar | list[Scalar] | FilteredValue | list[FilteredValue]
"""A scalar, a gradient (list interpolated across a slice's layers) or a filtered list."""

Parameters = dict[str, ParameterSetting]


class ModelSource(BaseModel):
    """An entry of `models:`: a model directory and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: Parameters | None = None


class SliceSource(BaseModel):
    """A source of an output slice: layers `[start, end)` of one model."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(BaseModel):
    """A block of consecutive output layers, merged from sources of equal length."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None  # refused: mergekit 0.1.5 parses it but never applies it

    @field_validator("residual_weight")
    @classmethod
    def _no_residual_weight(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("not implemented (mergekit 0.1.5 accepts it but never applies it); remove it")
        return value


class ModelTokenSource(BaseModel):
    """`{kind: model_token, model, token | token_id}`: a row of one model's own vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class ZeroSource(BaseModel):
    """`{kind: zero}`: a zero row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zero"]


class TokenSetting(BaseModel):
    """Where one token's embedding rows come from (mergekit's `tokenizer.tokens.<token>`): a model
    (its row for this token), a row of a model by token or id, or zero. Without `force` the rule
    only fills the rows of models that lack the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerConfig(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary (`union` of all models, the `base`
    model's, or one model's), extra tokens with their row sources, and padding of the row count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


_RECIPE_BLOCKS: dict[str, type[BaseModel]] = {}
# Blocks defined next to the feature that reads them, imported when a recipe uses one (so a recipe
# parses the same whether or not that feature's module was imported before).
_BLOCK_MODULES = {"calibration": "evomerge.merge.data_aware.calibration"}
_UNSUPPORTED_KEYS = {
    "modules": "multi-module (vision-language) recipes are not supported; use models: or slices:",
    "chat_template": "chat_template: is not supported; edit tokenizer_config.json of the output",
}


def register_recipe_block(name: str, model: type[BaseModel]) -> None:
    """Allow an extra top-level recipe key (e.g. `calibration`), validated by `model`."""
    if name in Recipe.model_fields or name in _UNSUPPORTED_KEYS:
        raise ValueError(f"recipe key {name!r} is reserved")
    _RECIPE_BLOCKS[name] = model


class Recipe(BaseModel):
    """A merge recipe in mergekit's schema, plus an optional `seed` for random methods."""

    model_config = ConfigDict(extra="allow")

    merge_method: str
    base_model: str | None = None
    models: list[ModelSource] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    seed: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _extra_blocks(self) -> Recipe:
        for key, value in list((self.model_extra or {}).items()):
            if key in _UNSUPPORTED_KEYS:
                raise ValueError(f"{key}: {_UNSUPPORTED_KEYS[key]}")
            if key not in _RECIPE_BLOCKS and key in _BLOCK_MODULES:
                importlib.import_module(_BLOCK_MODULES[key])  # registers the block
            block = _RECIPE_BLOCKS.get(key)
            if block is None:
                known = sorted(set(Recipe.model_fields) | set(_RECIPE_BLOCKS))
                raise ValueError(f"{key}: unknown top-level key (known: {', '.join(known)})")
            if not isinstance(value, block):
                try:
                    self.model_extra[key] = block.model_validate(value)  # type: ignore[index]
                except ValidationError as exc:  # name the block's field: `calibration.examples: ...`
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in (key, *first["loc"]) if not _is_union_tag(p))
                    msg = first["msg"].removeprefix("Value error, ")
                    got = "" if first["type"].startswith("value_error") else f" (got {shown(first.get('input'))})"
                    raise ValueError(f"{where}: {msg}{got}") from None
        return self

    @model_validator(mode="after")
    def _one_tokenizer(self) -> Recipe:
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("tokenizer_source: give either tokenizer_source: or a tokenizer: block, not both")
        return self

    @model_validator(mode="after")
    def _one_layout(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError("models/slices: give exactly one of `models:` or `slices:`, non-empty")
        return self

    # -- convenience -------------------------------------------------------------------------

    def output_slices(self) -> list[OutputSlice]:
        """The recipe as slices; `models:` becomes one slice whose layer ranges are filled later."""
        if self.slices is not None:
            return list(self.slices)
        return [
            OutputSlice(
                sources=[
                    SliceSource(model=m.model, layer_range=(0, 0), parameters=m.parameters) for m in self.models or []
                ]
            )
        ]

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, base first, each once, in order of appearance."""
        names: list[str] = []
        for name in self._iter_model_names():
            if name not in names:
                names.append(name)
        return names

    def _iter_model_names(self) -> Iterator[str]:
        if self.base_model:
            yield self.base_model
        for m in self.models or []:
            yield m.model
        for s in self.slices or []:
            if s.base_model:
                yield s.base_model
            for src in s.sources:
                yield src.model

    def vocabulary_source(self) -> str | None:
        """`union`, `base`, a model reference, or None (no vocabulary merging): the tokenizer:
        block's `source`, else `tokenizer_source`."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def with_seed(self, seed: int | None) -> Recipe:
        return self.model_copy(update={"seed": seed})


# -- loading and dumping ---------------------------------------------------------------------


def _format_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as `field.path: problem (got value)`; one line."""
    errors = exc.errors()
    first = errors[0]
    loc = [part for part in first["loc"] if not _is_union_tag(part)]
    path = _format_loc(loc)
    if "parameters" in loc and len(loc) >= loc.index("parameters") + 2:
        name_end = loc.index("parameters") + 2
        path = _format_loc(loc[:name_end])
        return (
            f"{path}: invalid parameter value (got {shown(first.get('input'))}); expected a number, a list of numbers"
            " (gradient) or a list of {filter: ..., value: ...}"
        )
    if "layer_range" in loc:
        path = _format_loc(loc[: loc.index("layer_range") + 1])
        return f"{path}: expected [start, end] as two integers (got {shown(first.get('input'))})"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return msg if not path else f"{path}: {msg}"
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if first["type"] == "missing":
        return f"{path}: required field is missing"
    return f"{path or 'recipe'}: {msg} (got {shown(first.get('input'))})"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"bool", "int", "float", "str"})


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a mapping (e.g. from YAML) into a Recipe; errors are one line naming the field."""
    if not isinstance(data, Mapping):
        raise EvomergeError(f"{source}: expected a mapping with merge_method and models/slices")
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        message = _format_validation_error(exc)
        raise EvomergeError(message if source == "recipe" else f"{message} (in {source})") from None


def parse_recipe_text(text: str, *, source: str = "journal recipe") -> Recipe:
    """A recipe from the YAML text a run directory stores (journal records, pareto.json)."""
    return parse_recipe(yaml.safe_load(text), source=source)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe safely (no arbitrary object construction)."""
    path = Path(path)
    return loads_recipe(read_text(path, "recipe"), source=str(path))


def loads_recipe(text: str, *, source: str = "recipe") -> Recipe:
    return parse_recipe(parse_yaml(text, source), source=source)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data in mergekit's key order, without unset optional fields."""
    return recipe.model_dump(mode="json", exclude_none=True)


class _FlowListDumper(yaml.SafeDumper):
    """Dump lists of scalars inline (`[0, 0.5, 1]`), like hand-written recipes."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, (int, float, str, bool)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def dump_recipe(recipe: Recipe) -> str:
    """YAML text that `loads_recipe` turns back into an equal Recipe (and mergekit can read)."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_FlowListDumper, sort_keys=False)


# -- parameter settings ----------------------------------------------------------------------


def as_number(value: Any) -> float | None:
    """A number from a scalar setting value, accepting YAML's `1e-3` strings; None if not numeric."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range (YAML reads 1000...0 as an int)
            return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def interpolate_gradient(values: list[Any], t: float) -> Any:
    """Piecewise-linear value of a gradient at `t` in [0, 1]; discrete pick for non-numbers."""
    numbers = [as_number(v) for v in values]
    if any(n is None for n in numbers):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(math.floor(scaled))
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * numbers[i0] + frac * numbers[i1]  # type: ignore[operator]


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """Resolve one setting for one tensor; None when a filtered list has no matching entry.

    Filters match by substring, the first match wins, `filter: None` or `"*"` matches all.
    """
    if isinstance(setting, FilteredValue):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(item, FilteredValue) for item in setting):
            for item in setting:
                if item.filter in (None, "*") or item.filter in tensor_name:
                    return evaluate_setting(item.value, tensor_name, t)  # type: ignore[arg-type]
            return None
        return interpolate_gradient(setting, t)
    return setting


def setting_scalars(setting: ParameterSetting) -> list[Any]:
    """Every scalar that appears in a setting (for type and bounds checks before merging)."""
    if isinstance(setting, FilteredValue):
        return setting_scalars(setting.value)  # type: ignore[arg-type]
    if isinstance(setting, list):
        out: list[Any] = []
        for item in setting:
            out.extend(setting_scalars(item))
        return out
    return [setting]
