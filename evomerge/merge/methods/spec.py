"""What the registry declares about each merge method, without torch: recipes are validated
(parameter names, bounds, scopes, input counts) before torch is imported, and `evomerge merge`
reports a bad recipe in a fraction of a second. The functions themselves are `LazyFn`s, imported
on their first call."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evomerge.merge.recipe import as_number

ParamScope = Literal["model", "global"]
# required: the base is the anchor (task vectors); optional: used as the anchor when set;
# input: not an anchor, but a `base_model` missing from `models:` is merged as one more input
# (mergekit adds it to the inputs of every method); ignored: never read.
BasePolicy = Literal["required", "optional", "input", "ignored"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method accepts.

    `scope="model"`: one value per (non-base) input, set under a model/source or inherited from
    slice/top-level `parameters`. `scope="global"`: one value per tensor, set at slice/top level.
    """

    name: str
    kind: type  # float, int, bool or str
    scope: ParamScope
    default: Any = None
    required: bool = False
    low: float | None = None  # inclusive bounds, checked on every value in the recipe
    high: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    def check(self, value: Any) -> str | None:
        """Why `value` is invalid for this parameter, or None if it is fine."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "expected true or false"
        if self.kind is str:
            if not isinstance(value, str):
                return "expected a string"
            if self.choices and value not in self.choices:
                return f"expected one of {', '.join(self.choices)}"
            return None
        number = as_number(value)
        if number is None:
            return "expected a finite number"
        if self.kind is int and number != int(number):
            return "expected a whole number"
        if self.low is not None and number < self.low:
            return f"must be >= {self.low:g}"
        if self.high is not None and number > self.high:
            return f"must be <= {self.high:g}"
        return None

    def coerce(self, value: Any) -> Any:
        if self.kind is int:
            # a gradient interpolates between whole numbers; round like an iteration count must be
            return int(round(as_number(value)))  # type: ignore[arg-type]
        return as_number(value) if self.kind is float else value


@dataclass(frozen=True)
class LazyFn:
    """A function named by module and attribute, imported when first called."""

    module: str
    attr: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def resolve(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.attr)


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: the YAML name, the function and the contract the planner enforces."""

    name: str
    fn: Callable[..., Any]  # fn(call: MethodCall) -> Tensor; a LazyFn in the registry
    params: tuple[ParamSpec, ...]
    base: BasePolicy
    min_inputs: int = 1  # non-base inputs
    max_inputs: int | None = None
    random: bool = False
    defaults_note: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")
