"""Recipe dtype names, without torch: validation checks a recipe before torch is imported."""

from __future__ import annotations

from evomerge.errors import EvomergeError

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}


def canonical_dtype(name: str, field: str) -> str:
    """The torch dtype name a recipe's `dtype`/`out_dtype` means, or one line naming the field."""
    key = ALIASES.get(name, name)
    if key not in DTYPE_NAMES:
        raise EvomergeError(f"{field}: unknown dtype {name!r} (use one of {', '.join(DTYPE_NAMES)})")
    return key
