"""Method-aware recipe checks that need no model files: they run in milliseconds, before any
directory is opened, and each failure is one line naming the field, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterator

from evomerge.errors import EvomergeError, shown
from evomerge.io.dtypes import canonical_dtype
from evomerge.merge.methods.registry import get_method
from evomerge.merge.methods.spec import MergeMethod
from evomerge.merge.recipe import FilteredValue, Parameters, Recipe, setting_scalars


def validate_recipe(recipe: Recipe) -> MergeMethod:
    """Check everything that does not depend on model files; return the method."""
    method = get_method(recipe.merge_method)
    for field in ("dtype", "out_dtype"):
        value = getattr(recipe, field)
        if value is not None:
            canonical_dtype(value, field)
    for path, params, level in _parameter_blocks(recipe):
        _check_parameters(method, path, params, level)
    _check_layout(method, recipe)
    from evomerge.merge.data_aware.checks import check_data_aware

    check_data_aware(recipe, method)
    return method


def _parameter_blocks(recipe: Recipe) -> Iterator[tuple[str, Parameters, str]]:
    if recipe.parameters:
        yield "parameters", recipe.parameters, "top"
    for i, m in enumerate(recipe.models or []):
        if m.parameters:
            yield f"models[{i}].parameters", m.parameters, "source"
    for i, s in enumerate(recipe.slices or []):
        if s.parameters:
            yield f"slices[{i}].parameters", s.parameters, "slice"
        for j, src in enumerate(s.sources):
            if src.parameters:
                yield f"slices[{i}].sources[{j}].parameters", src.parameters, "source"


def _check_parameters(method: MergeMethod, path: str, params: Parameters, level: str) -> None:
    for name, setting in params.items():
        spec = method.param(name)
        if spec is None:
            accepted = ", ".join(p.name for p in method.params) or "none"
            raise EvomergeError(f"{path}.{name}: unknown parameter for {method.name} (accepted: {accepted})")
        if level == "source" and spec.scope == "global":
            raise EvomergeError(
                f"{path}.{name}: {name} is a global parameter of {method.name}; "
                "set it under the top-level (or slice) parameters"
            )
        if setting == [] or (isinstance(setting, FilteredValue) and setting.value == []):
            raise EvomergeError(f"{path}.{name}: empty list; give a value or a gradient of values")
        for value in setting_scalars(setting):
            if isinstance(value, list) and not value:
                raise EvomergeError(f"{path}.{name}: empty gradient")
            if isinstance(value, float) and not math.isfinite(value):  # YAML .nan / .inf
                raise EvomergeError(f"{path}.{name}: must be a finite number (got {shown(value)})")
            reason = spec.check(value)
            if reason:
                raise EvomergeError(f"{path}.{name}: {reason} (got {shown(value)})")


def _check_layout(method: MergeMethod, recipe: Recipe) -> None:
    if recipe.models is not None:
        groups = [
            (
                "models",
                [(f"models[{i}]", m.model, m.parameters) for i, m in enumerate(recipe.models)],
                recipe.base_model,
                None,
            )
        ]
    else:
        groups = []
        for i, s in enumerate(recipe.slices or []):
            sources = [(f"slices[{i}].sources[{j}]", src.model, src.parameters) for j, src in enumerate(s.sources)]
            _check_slice_ranges(i, s)
            groups.append((f"slices[{i}].sources", sources, s.base_model or recipe.base_model, s.parameters))
    for where, sources, base, slice_params in groups:
        if method.base == "required" and not base:
            raise EvomergeError(f"base_model: {method.name} needs a base model; set base_model:")
        others = sources if method.base in ("ignored", "input") else [s for s in sources if s[1] != base]
        if method.base == "input" and base and recipe.models is not None and all(s[1] != base for s in sources):
            others = [*others, ("base_model", base, None)]  # mergekit merges it as one more input
            _check_base_as_input(method, recipe, len(others))
        if method.base in ("required", "optional") and base and recipe.slices is not None and others == sources:
            raise EvomergeError(
                f"{where}: the base model {base!r} must be one of the sources of the slice "
                "(with the same layer_range as the others)"
            )
        _check_input_count(method, where, len(others))
        for path, _model, params in others:
            for spec in method.model_params:
                if spec.required and not any(p and spec.name in p for p in (params, slice_params, recipe.parameters)):
                    raise EvomergeError(
                        f"{path}.parameters.{spec.name}: required by {method.name}; set it for "
                        "this model or under the top-level parameters"
                    )


def _check_base_as_input(method: MergeMethod, recipe: Recipe, count: int) -> None:
    """A base_model outside `models:` is one more input of a method without a base role (mergekit
    plans it so); say so rather than fail later on a count or a weight the user never wrote."""
    added = "merges a base_model that is not listed under models: as one more input (as mergekit does)"
    if method.max_inputs is not None and count > method.max_inputs:
        raise EvomergeError(
            f"base_model: {method.name} {added}, which makes {count} models but it takes at most "
            f"{method.max_inputs}; remove base_model"
        )
    for spec in method.model_params:
        if spec.required and not (recipe.parameters and spec.name in recipe.parameters):
            raise EvomergeError(
                f"base_model: {method.name} {added}, but no {spec.name} applies to it; list it under "
                f"models: with a {spec.name}, set a top-level {spec.name}, or remove base_model"
            )


def _check_input_count(method: MergeMethod, where: str, count: int) -> None:
    besides = " besides the base" if method.base == "required" else ""
    if method.max_inputs is not None and method.min_inputs == method.max_inputs and count != method.min_inputs:
        raise EvomergeError(f"{where}: {method.name} takes exactly {method.min_inputs} model(s){besides} (got {count})")
    if count < method.min_inputs:
        raise EvomergeError(
            f"{where}: {method.name} needs at least {method.min_inputs} model(s){besides} (got {count})"
        )
    if method.max_inputs is not None and count > method.max_inputs:
        raise EvomergeError(f"{where}: {method.name} takes at most {method.max_inputs} model(s){besides} (got {count})")


def _check_slice_ranges(i: int, output_slice) -> None:
    lengths = []
    for j, src in enumerate(output_slice.sources):
        start, end = src.layer_range
        if start < 0 or end <= start:
            raise EvomergeError(
                f"slices[{i}].sources[{j}].layer_range: {shown([start, end])} is not a non-empty "
                "half-open range [start, end) with 0 <= start < end"
            )
        lengths.append(end - start)
    for j, length in enumerate(lengths):
        if length != lengths[0]:
            raise EvomergeError(
                f"slices[{i}].sources[{j}].layer_range: {shown(list(output_slice.sources[j].layer_range))} "
                f"has {length} layers but sources[0] has {lengths[0]}; sources of a slice need equal lengths"
            )
