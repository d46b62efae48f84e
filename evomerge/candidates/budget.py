"""How much memory a search worker's candidate caches may take: cache modes and one shared byte pool.

A worker holds three things (docs/memory.md):

    memory = sources + candidate targets + caches + workspace

Sources are the checkpoints in their stored dtype (mmap-backed on CPU); a candidate target is the
transformers model candidates are written into (the output's bytes); caches are what candidates
share: task vectors and their sort data (`DeltaStore`), DARE/DELLA mask draws (`DrawStore`) and the
concatenated inputs of the flat pass for tiny models. Workspace is the per-tensor (or per-chunk)
temporaries of the tensor being merged.

`cache` picks how caches are bounded:

- `full`: every cache entry is kept (mask draws up to `draw_cache_bytes`): the fastest candidates,
  about 5-6x the sources' bytes in caches for a TIES/DARE search of fp32 sources;
- `budgeted`: caches share what `memory_budget` leaves after sources, targets and a workspace
  reserve; entries that do not fit are not kept, and their tensors are recomputed per candidate,
  streamed chunk by chunk into the live model (candidates/stream.py);
- `minimal`: no caches at all; every task-vector candidate is streamed (the slowest, least memory).

All modes give bit-identical candidates (tested).

Why not a plain LRU: a search visits every tensor of the model in the same order for every
candidate, and an LRU smaller than that cycle evicts each entry just before it is needed again
(every lookup misses). `ByteCache` instead keeps what it admitted and evicts only entries that
went unused for a whole candidate (another recipe structure, an old mask seed), so a budget that
holds 60% of the entries serves 60% of the lookups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any, Literal

from evomerge.errors import EvomergeError

CacheMode = Literal["full", "budgeted", "minimal"]
CACHE_MODES: tuple[str, ...] = ("full", "budgeted", "minimal")
MIN_WORKSPACE_BYTES = 64 << 20


def cache_mode(mode: str | None, memory_budget: int | None) -> CacheMode:
    """The mode to run: `budgeted` when only a budget is given, `full` when neither is."""
    if mode is None:
        return "budgeted" if memory_budget is not None else "full"
    if mode not in CACHE_MODES:
        raise EvomergeError(f"cache: {mode!r} is not one of {', '.join(CACHE_MODES)}")
    if mode == "budgeted" and memory_budget is None:
        raise EvomergeError("cache: budgeted needs memory_budget (e.g. memory_budget: 40GB)")
    return mode  # type: ignore[return-value]


def parse_budget(value: int | float | str | None, field: str = "memory_budget") -> int | None:
    """Bytes from 40GB, 512MiB or a byte count (None: no budget)."""
    if value is None:
        return None
    from evomerge.io.checkpoint import parse_size

    if isinstance(value, bool):
        raise EvomergeError(f"{field}: expected a size such as 40GB (got {value!r})")
    return parse_size(str(int(value)) if isinstance(value, (int, float)) else value, field=field)


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


class ByteCache:
    """Cached tensors of several kinds (`key[0]` names the kind) within one byte limit.

    `max_bytes=None` is unbounded; `limits` bounds single kinds (the mask draws of `full` mode).
    Entries are admitted while they fit; to make room only entries idle for a whole candidate are
    evicted (least recently used first): `tick()` marks the start of a candidate."""

    def __init__(self, max_bytes: int | None = None, limits: dict[str, int] | None = None):
        self.max_bytes = max_bytes
        self.limits = dict(limits or {})
        self.generation = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int, int]] = OrderedDict()  # key -> (value, bytes, used)
        self._bytes: dict[str, int] = {}
        self.misses = 0  # lookups of entries that could not be admitted (recomputed instead)

    def tick(self) -> None:
        self.generation += 1

    @property
    def enabled(self) -> bool:
        return self.max_bytes is None or self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def kind_bytes(self, kind: str) -> int:
        return self._bytes.get(kind, 0)

    def kind_count(self, kind: str) -> int:
        return sum(1 for key in self._entries if key[0] == kind)  # type: ignore[index]

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries[key] = (entry[0], entry[1], self.generation)
        self._entries.move_to_end(key)
        return entry[0]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def reserve(self, wanted: Iterable[tuple[Hashable, int]]) -> bool:
        """Make room for every (key, bytes) not yet cached, evicting idle entries; False (and
        nothing evicted) when they cannot all fit. A key already cached with other bytes is
        counted at its new size (it is about to be replaced)."""
        need: dict[str, int] = {}
        replacing: dict[str, int] = {}
        for key, nbytes in wanted:
            kind = key[0]  # type: ignore[index]
            old = self._entries.get(key)
            if old is not None and old[1] == nbytes:
                continue
            need[kind] = need.get(kind, 0) + nbytes
            if old is not None:
                replacing[kind] = replacing.get(kind, 0) + old[1]
        if not need:
            return True
        if not self.enabled:
            self.misses += 1
            return False
        idle = [k for k, (_, _, used) in self._entries.items() if used < self.generation - 1]
        plan: list[Hashable] = []
        freed: dict[str, int] = dict(replacing)

        def fits() -> bool:
            for kind, extra in need.items():
                limit = self.limits.get(kind)
                if limit is not None and self.kind_bytes(kind) - freed.get(kind, 0) + extra > limit:
                    return False
            if self.max_bytes is None:
                return True
            return self.nbytes - sum(freed.values()) + sum(need.values()) <= self.max_bytes

        for key in idle:
            if fits():
                break
            plan.append(key)
            kind = key[0]  # type: ignore[index]
            freed[kind] = freed.get(kind, 0) + self._entries[key][1]
        if not fits():
            self.misses += 1
            return False
        for key in plan:
            self.drop(key)
        return True

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Store `value` if it fits (see `reserve`); False when it was not stored."""
        if not self.reserve([(key, nbytes)]):
            return False
        self.drop(key)
        self._entries[key] = (value, nbytes, self.generation)
        kind = key[0]  # type: ignore[index]
        self._bytes[kind] = self._bytes.get(kind, 0) + nbytes
        return True

    def resize(self, max_bytes: int | None) -> None:
        """A new limit; over it, entries are dropped least recently used first."""
        self.max_bytes = max_bytes
        while max_bytes is not None and self._entries and self.nbytes > max_bytes:
            self.drop(next(iter(self._entries)))

    def drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            kind = key[0]  # type: ignore[index]
            self._bytes[kind] -= entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self._bytes.clear()
