"""Hypothesis strategies for malformed user input: a valid YAML document (a recipe, a search space)
with a few edits anywhere in its tree, or a few bytes changed in its text.

An edit deletes a key or list entry, adds one (a known key of the schema, or a stranger), replaces a
value with an odd one (wrong type, NaN/inf, huge or negative numbers, empty containers, unicode and
odd paths, or a value of the schema's own vocabulary put in the wrong place), empties a container,
wraps a value in a list, or duplicates a list entry. The fuzz tests then assert that each input ends
in success or a one-line `EvomergeError` (tests/merge/test_fuzz_recipes.py, tests/test_fuzz_spaces.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from hypothesis import strategies as st

from evomerge.errors import EvomergeError

ODD_NUMBERS: list[Any] = [
    0,
    1,
    -1,
    2,
    3,
    0.5,
    -0.5,
    1.5,
    -3,
    1e-300,
    1e300,
    -1e308,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    10**400,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
]
ODD_STRINGS: list[str] = [
    "",
    " ",
    "nan",
    ".nan",
    "-.inf",
    "1e-3",
    "1e999",
    "ünïcødé",
    "模型",
    "😀",
    "a\nb",
    "\t",
    "\x00",
    "..",
    "../..",
    "/",
    ".",
    "~",
    "~evomerge-nouser/x",
    "/dev/null",
    "/proc/self",
    "C:\\model",
    "org/model",
    "base+adapter",
    "x" * 300,
    "/" + "d/" * 40 + "e" * 260,
    "*",
    "null",
    "[1, 2]",
]
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
ODD_SCALARS = st.one_of(st.none(), st.sampled_from(ODD_NUMBERS), st.sampled_from(ODD_STRINGS), _TEXT, st.floats())
ODD_VALUES = st.recursive(
    ODD_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT | st.sampled_from(["value", "filter"]), inner),
    max_leaves=5,
)


@dataclass(frozen=True)
class Schema:
    """What the edits may draw from besides odd values: the document's own keys and typical values
    (method names, model references, layer ranges, gradients, filter lists)."""

    keys: Sequence[str]
    values: st.SearchStrategy[Any]


def _locations(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into the tree (the root is ())."""
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _locations(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _locations(value, (*path, i))
    return out


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        root = root[part]
    return root


def _set(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


EDITS = ("delete", "replace", "schema_value", "add_key", "empty", "wrap", "duplicate")


@st.composite
def edited(draw: st.DrawFn, bases: Sequence[dict[str, Any]], schema: Schema, max_edits: int = 3) -> Any:
    """One of `bases`, edited 0..max_edits times at random places."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(list(bases))))
    for _ in range(draw(st.integers(0, max_edits))):
        path = draw(st.sampled_from(_locations(doc)))
        node = _get(doc, path)
        edit = draw(st.sampled_from(EDITS))
        if edit == "delete" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif edit == "replace":
            doc = _set(doc, path, copy.deepcopy(draw(ODD_VALUES)))
        elif edit == "schema_value":
            doc = _set(doc, path, copy.deepcopy(draw(schema.values)))
        elif edit == "add_key" and isinstance(node, dict):
            key = draw(st.sampled_from(list(schema.keys)) | _TEXT | st.sampled_from([1, None, True, 1.5]))
            node[key] = copy.deepcopy(draw(schema.values | ODD_VALUES))
        elif edit == "add_key" and isinstance(node, list):
            node.append(copy.deepcopy(draw(st.sampled_from(node)) if node else draw(schema.values)))
        elif edit == "empty" and isinstance(node, (dict, list)):
            doc = _set(doc, path, type(node)())
        elif edit == "wrap":
            doc = _set(doc, path, [copy.deepcopy(node)])
        elif edit == "duplicate" and isinstance(node, list) and node:
            node.insert(draw(st.integers(0, len(node))), copy.deepcopy(draw(st.sampled_from(node))))
    return doc


TEXT_NOISE = ["\t", ":", "- ", "{", "]", "&a ", "*a", "!!python/object:os.system ", "\x85", "\ufeff", "%YAML 9\n", "'"]


@st.composite
def yaml_text(draw: st.DrawFn, docs: st.SearchStrategy[Any]) -> str:
    """A document as YAML text; sometimes with a few characters of YAML syntax dropped in."""
    text = yaml.safe_dump(draw(docs), sort_keys=False, allow_unicode=draw(st.booleans()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(TEXT_NOISE)) + text[at:]
    return text


def one_line(error: EvomergeError) -> str:
    """The error's message, checked to be what the CLI prints as one `error:` line."""
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, repr(message)
    assert len(message) < 2000, f"{len(message)} characters: {message[:300]}..."
    return message
