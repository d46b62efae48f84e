"""Vocabulary merging: mergekit 0.1.5's `tokenizer:` block and `tokenizer_source`, one implementation
for both sinks (`evomerge merge` and the search workers' in-memory candidates).

A recipe that names a vocabulary source gets an output tokenizer: the `base` model's (tokens past
its embedding rows dropped), one `<model>`'s, or the `union` of all models' tokens (base first,
then each model's tokens in recipe order, each model's plain tokens in id order, then every model's
added tokens, the first setting of a token winning; mergekit's order there depends on hashing, see
docs/merge.md), plus the keys of `tokens:`. Every embedding
and lm_head row is then looked up by token string (`Vocabulary.rows`): a model's row for a token
it has is its own; a row it lacks is filled as mergekit fills it: from the one model that has the
token, else from the base model if it has it, else the mean over the models that have it, else
zero; a `tokens:` entry overrides that rule (and with `force: true` replaces even present rows).
Rows added by `pad_to_multiple_of` are the mean of each model's real rows. The merge method then
sees aligned tensors, so task vectors of a token a fine-tune lacks are zero.

Everything that decides the rows is known at plan time (`VocabularyGroup`), so a bad token source
fails before any tensor is read; aligning is gathers and a few means per tensor group.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.jobs import ModelInfo, TensorRef
from evomerge.merge.recipe import ModelTokenSource, Recipe, TokenizerConfig, ZeroSource

Fetch = Callable[[TensorRef], torch.Tensor]


@dataclass(frozen=True)
class _Rule:
    """A `tokens:` entry resolved against the plan: where the token's rows come from."""

    kind: str  # "model" (that model's row for the token), "model_token", "zero", "none" (no source)
    model: Path | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False
    reference: str = ""  # as the recipe wrote the model, for messages


@dataclass(eq=False)
class Vocabulary:
    """The output vocabulary of a merge and, per source model (by path), the row each output token
    has in that model (-1: the model lacks the token)."""

    tokenizer: Any  # a transformers tokenizer: what the merged model is saved and scored with
    tokens: list[str]  # output token of each row id
    size: int  # rows of the merged vocabulary tensors (len(tokens) padded to pad_to_multiple_of)
    rows: dict[Path, torch.Tensor]  # model -> int64 [len(tokens)]: its row of each output token or -1
    vocabs: dict[Path, dict[str, int]]  # model -> its own tokenizer's vocabulary (model_token sources)
    rules: dict[str, _Rule]  # the recipe's `tokens:` entries
    key: str  # digest of everything above: equal keys, equal alignment

    def is_identity(self, path: Path, rows: int) -> bool:
        """True when the model's rows already are the output rows, in order, with nothing forced."""
        mine = self.rows[path]
        return (
            rows == self.size == len(self.tokens)
            and not any(rule.force for rule in self.rules.values())
            and bool(torch.equal(mine, torch.arange(len(self.tokens))))
        )

    def save(self, directory: Path) -> None:
        """Write the output tokenizer's files into `directory` (the caller's atomic temp dir)."""
        from evomerge.io.file_modes import apply_umask

        self.tokenizer.save_pretrained(str(directory))
        apply_umask(directory)


# -- building the output vocabulary ---------------------------------------------------------------------


def build_vocabulary(
    recipe: Recipe,
    models: Sequence[ModelInfo],
    referenced: Sequence[int],
    base: int,
    resolve: Callable[[str, str], int],
    cache: dict[Any, Vocabulary] | None = None,
) -> Vocabulary | None:
    """The recipe's output vocabulary, or None when the recipe merges no vocabularies.

    `referenced`: plan indices of the recipe's models in recipe order; `base`: the recipe's base
    model, else its first model; `resolve(reference, field)`: plan index of a model reference."""
    source = recipe.vocabulary_source()
    if source is None:
        return None
    config = recipe.tokenizer or TokenizerConfig(source=source)
    where = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    out_model = None if source in ("union", "base") else resolve(source, where)
    rules = {token: _rule(token, rule, models, referenced, resolve) for token, rule in (config.tokens or {}).items()}
    order = [base] + [m for m in referenced if m != base]
    key_parts = (
        config.model_dump_json(),
        str(models[out_model].path) if out_model is not None else source,
        tuple(str(models[m].path) for m in order),
    )
    if cache is not None and key_parts in cache:
        return cache[key_parts]
    tokenizers = {m: _load_tokenizer(models[m], where) for m in order}
    base_tokenizer = _strip(tokenizers[base], _vocab_rows(models[base], tokenizers[base]), models[base], where)
    tokenizers[base] = base_tokenizer
    if out_model is not None:
        out = _load_tokenizer(models[out_model], where)
    elif source == "base":
        out = _fresh_copy(base_tokenizer)
    else:
        out = _union(base_tokenizer, [(tokenizers[m], _vocab_rows(models[m], tokenizers[m])) for m in order])
    present = set(out.get_vocab())
    for token in config.tokens or {}:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    vocab = out.get_vocab()
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        if idx >= len(tokens):
            raise EvomergeError(f"{where}: the output tokenizer's ids have gaps (token {token!r} has id {idx})")
        tokens[idx] = token
    size = len(tokens)
    if config.pad_to_multiple_of and size % config.pad_to_multiple_of:
        size += config.pad_to_multiple_of - size % config.pad_to_multiple_of
    rows: dict[Path, torch.Tensor] = {}
    vocabs: dict[Path, dict[str, int]] = {}
    for m in order:
        own = tokenizers[m].get_vocab()
        limit = _vocab_rows(models[m], tokenizers[m])
        vocabs[models[m].path] = own
        rows[models[m].path] = torch.tensor(
            [own[t] if t in own and own[t] < limit else -1 for t in tokens], dtype=torch.int64
        )
    digest = hashlib.sha256(json.dumps([key_parts, tokens, size], default=str).encode()).hexdigest()[:16]
    vocabulary = Vocabulary(out, tokens, size, rows, vocabs, rules, digest)
    if cache is not None:
        cache[key_parts] = vocabulary
    return vocabulary


def _rule(token: str, setting: Any, models: Sequence[ModelInfo], referenced: Sequence[int], resolve) -> _Rule:
    where = f"tokenizer.tokens.{token}.source"
    src = setting.source
    if src is None:
        return _Rule("none", force=setting.force)
    if isinstance(src, ZeroSource):
        return _Rule("zero", force=setting.force)
    reference = src.model if isinstance(src, ModelTokenSource) else src
    index = resolve(reference, where)
    if models[index].path not in {models[m].path for m in referenced}:
        names = ", ".join(repr(models[m].reference) for m in referenced)
        raise EvomergeError(f"{where}: {reference!r} is not one of the recipe's models ({names}); name one of them")
    if isinstance(src, ModelTokenSource):
        return _Rule("model_token", models[index].path, src.token_id, src.token, setting.force, reference)
    return _Rule("model", models[index].path, force=setting.force, reference=reference)


def _vocab_rows(info: ModelInfo, tokenizer: Any) -> int:
    """How many vocabulary rows the model has: config `vocab_size` (mergekit's rule), else its
    tokenizer's length."""
    value = info.config.get("vocab_size")
    return value if isinstance(value, int) else len(tokenizer.get_vocab())


def _load_tokenizer(info: ModelInfo, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same user error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(
            f"{where}: cannot load the tokenizer of {info.reference!r} ({reason}); merging vocabularies "
            "needs every model's tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None


def _fresh_copy(tokenizer: Any) -> Any:
    """An independent tokenizer equal to `tokenizer` (adding tokens must not change a source's)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="evomerge-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _strip(tokenizer: Any, rows: int, info: ModelInfo, where: str) -> Any:
    """The base tokenizer without tokens whose ids have no embedding row (id >= vocab_size)."""
    unused = {token for token, idx in tokenizer.get_vocab().items() if idx >= rows}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer._tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if data is None or data["model"]["type"] != "BPE":
        raise EvomergeError(
            f"{where}: the tokenizer of {info.reference!r} has {len(unused)} tokens past its {rows} embedding rows; "
            "dropping them is supported for fast BPE tokenizers only"
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < rows]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(part in unused for part in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    stripped = _fresh_copy(tokenizer)
    stripped._tokenizer = Tokenizer.from_str(json.dumps(data))
    return stripped


def _union(base: Any, tokenizers: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every other token of `tokenizers` (mergekit's `union`)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in tokenizers:
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if idx < rows:
                plain.setdefault(token)
        for idx, info in tokenizer.added_tokens_decoder.items():
            if idx < rows:
                added.setdefault(info.content, info)
    out = _fresh_copy(base)
    base_vocab = base.get_vocab()
    new = [token for token in plain if token not in added and token not in base_vocab]
    if new:
        out.add_tokens(new)  # one call: ids in list order, as one call per token would give
    if added:
        out.add_tokens(list(added.values()))  # each keeps its own settings (special, strip, ...)
    return out


# -- aligning one tensor group ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fill:
    """The value of one output row for models whose own row is not used."""

    row: int
    kind: str  # "copy" (member, source row), "zero", "mean" (members with their rows)
    sources: tuple[tuple[int, int], ...] = ()  # (member position, row in that member's tensor)


@dataclass(eq=False)
class VocabularyGroup:
    """How the vocabulary tensors of one output tensor (its models, in the recipe's order) become
    rows of the output vocabulary. Built at plan time; `align` only gathers and averages."""

    vocabulary: Vocabulary
    name: str
    members: tuple[TensorRef, ...]  # raw refs, one per model (mergekit's order: recipe order)
    paths: tuple[Path, ...]
    input_dtype: torch.dtype | None
    fills: tuple[_Fill, ...]
    forced: tuple[int, ...]
    key: str = field(default="")

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VocabularyGroup) and other.key == self.key

    def ref(self, member: TensorRef) -> TensorRef:
        """The aligned stand-in for `member` (what jobs read)."""
        return TensorRef(member.model, member.name, vocabulary=self)

    def position(self, ref: TensorRef) -> int:
        return next(i for i, m in enumerate(self.members) if m.model == ref.model)

    def align(self, fetch: Fetch) -> list[torch.Tensor]:
        """Every member's tensor with rows in output-vocabulary order (`size` rows)."""
        vocabulary = self.vocabulary
        tensors = []
        for member in self.members:
            tensor = fetch(member)
            tensors.append(tensor.to(self.input_dtype) if self.input_dtype is not None else tensor)
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        device, rest = tensors[0].device, tuple(tensors[0].shape[1:])
        n = len(vocabulary.tokens)
        values = self._fill_values(tensors, dtype, rest)
        fill_rows = torch.tensor([fill.row for fill in self.fills], dtype=torch.int64)
        forced = torch.tensor(self.forced, dtype=torch.int64)
        out = []
        for path, tensor in zip(self.paths, tensors, strict=True):
            rows = vocabulary.rows[path].clone()
            rows[forced] = -1
            new = torch.zeros((vocabulary.size, *rest), dtype=dtype, device=device)
            own = (rows >= 0).nonzero().squeeze(1)
            new[own.to(device)] = tensor[rows[own].to(device)].to(dtype)
            missing = rows[fill_rows] < 0
            new[fill_rows[missing].to(device)] = values[missing.to(device)]
            if vocabulary.size > n:
                new[n:] = new[:n].mean(dim=0)
            out.append(new)
        return out

    def _fill_values(self, tensors: list[torch.Tensor], dtype: torch.dtype, rest: tuple[int, ...]) -> torch.Tensor:
        """The row of each fill (zero, a copy, or a mean summed in member order as mergekit sums)."""
        device = tensors[0].device
        values = torch.zeros((len(self.fills), *rest), dtype=dtype, device=device)
        copies: dict[int, tuple[list[int], list[int]]] = {}
        means: list[int] = []
        for i, fill in enumerate(self.fills):
            if fill.kind == "copy":
                member, row = fill.sources[0]
                copies.setdefault(member, ([], []))[0].append(i)
                copies[member][1].append(row)
            elif fill.kind == "mean":
                means.append(i)
        for member, (targets, rows) in copies.items():
            values[targets] = tensors[member][rows].to(dtype)
        if means:
            total = torch.zeros((len(means), *rest), dtype=dtype, device=device)
            for member in range(len(tensors)):
                targets, rows = [], []
                for j, i in enumerate(means):
                    for source_member, row in self.fills[i].sources:
                        if source_member == member:
                            targets.append(j)
                            rows.append(row)
                if targets:
                    total[targets] = total[targets] + tensors[member][rows]
            counts = torch.tensor([len(self.fills[i].sources) for i in means], dtype=dtype, device=device)
            values[means] = total / counts.view(-1, *([1] * len(rest)))
        return values


def vocabulary_group(
    vocabulary: Vocabulary,
    name: str,
    members: Sequence[TensorRef],
    paths: Sequence[Path],
    references: Sequence[str],
    base: Path | None,
    shapes: Sequence[tuple[int, ...]],
    input_dtype: torch.dtype | None,
) -> VocabularyGroup | None:
    """The alignment of one output tensor's vocabulary inputs, or None when every member's rows
    already are the output rows (nothing to do). `members`/`paths`/`references`/`shapes`: one per
    distinct model of the tensor, in recipe order; `base`: the recipe's (or slice's) base model."""
    if all(vocabulary.is_identity(p, s[0]) for p, s in zip(paths, shapes, strict=True)):
        return None
    for path, reference, shape in zip(paths, references, shapes, strict=True):
        if shape[1:] != shapes[0][1:]:
            raise EvomergeError(
                f"{name}: {reference!r} has shape {list(shape)} but {references[0]!r} has {list(shapes[0])}; "
                "only the vocabulary dimension may differ"
            )
        if path not in vocabulary.rows:
            raise EvomergeError(f"{name}: {reference!r} is not one of the models whose vocabulary was read")
    stacked = torch.stack([vocabulary.rows[p] for p in paths])  # [members, tokens]
    forced = {vocabulary.tokens.index(t) for t, rule in vocabulary.rules.items() if rule.force}
    needed = sorted(set((~(stacked >= 0).all(dim=0)).nonzero().squeeze(1).tolist()) | forced)
    rows = stacked[:, needed].tolist()  # per member, the source row of each needed token
    base_member = list(paths).index(base) if base in paths else None
    fills = []
    for k, row in enumerate(needed):
        token = vocabulary.tokens[row]
        rule = vocabulary.rules.get(token)
        have = [(i, rows[i][k]) for i in range(len(paths)) if rows[i][k] >= 0]
        if rule is None:
            if len(have) == 1:
                fills.append(_Fill(row, "copy", (have[0],)))
            elif not have:
                fills.append(_Fill(row, "zero"))
            elif base_member is not None and rows[base_member][k] >= 0:
                fills.append(_Fill(row, "copy", ((base_member, rows[base_member][k]),)))
            else:
                fills.append(_Fill(row, "mean", tuple(have)))
        else:
            fills.append(_rule_fill(rule, row, token, name, vocabulary, list(paths), stacked, shapes))
    key_data = [vocabulary.key, name, [str(p) for p in paths], [m.name for m in members], str(input_dtype)]
    key = hashlib.sha256(json.dumps(key_data).encode()).hexdigest()[:16]
    return VocabularyGroup(
        vocabulary, name, tuple(members), tuple(paths), input_dtype, tuple(fills), tuple(sorted(forced)), key
    )


def _rule_fill(rule: _Rule, row: int, token: str, name: str, vocabulary: Vocabulary, paths, rows, shapes) -> _Fill:
    where = f"tokenizer.tokens.{token}.source"
    if rule.kind == "zero":
        return _Fill(row, "zero")
    if rule.kind == "none":
        raise EvomergeError(
            f"{where}: required, because {token!r} is missing from some model of {name} (or force: true); "
            "give a model, {kind: model_token, ...} or {kind: zero}"
        )
    if rule.model not in paths:
        raise EvomergeError(f"{where}: {rule.reference!r} is not merged into {name}; name one of that tensor's models")
    member = paths.index(rule.model)
    if rule.kind == "model":
        source_row = int(rows[member, row])
        if source_row < 0:
            raise EvomergeError(f"{where}: {rule.reference!r} has no token {token!r}; name a model that has it")
        return _Fill(row, "copy", ((member, source_row),))
    source_row = rule.token_id
    if source_row is None:
        source_row = vocabulary.vocabs[rule.model].get(rule.token or "")
        if source_row is None:
            raise EvomergeError(f"{where}.token: {rule.reference!r} has no token {rule.token!r}")
    if source_row >= shapes[member][0]:
        raise EvomergeError(
            f"{where}.token_id: {source_row} is out of range for {rule.reference!r} ({shapes[member][0]} rows)"
        )
    return _Fill(row, "copy", ((member, source_row),))


class AlignedTensors:
    """Aligned vocabulary tensors by group key, computed once and then shared (a search worker
    keeps them for its lifetime; `evomerge merge` keeps only the group being merged)."""

    def __init__(self, keep: int | None = None):
        self._store: dict[str, list[torch.Tensor]] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, ref: TensorRef, fetch: Fetch) -> torch.Tensor:
        group = ref.vocabulary
        assert isinstance(group, VocabularyGroup)
        with self._lock:
            aligned = self._store.get(group.key)
            if aligned is None:
                aligned = group.align(fetch)
                if self._keep is not None and len(self._store) >= self._keep:
                    self._store.pop(next(iter(self._store)))
                self._store[group.key] = aligned
        return aligned[group.position(ref)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self._store.values() for t in tensors)
