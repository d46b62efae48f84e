"""On-disk cache of model-level statistics, keyed by model + data + settings.

A search plans hundreds of candidates over the same sources; Gram matrices and Fisher diagonals
depend only on (the model's weights, the calibration tokens, the estimator settings), so they are
computed once and reloaded. A model is identified by a content hash of its weight files (memoised
per process by path, size and mtime), not by its path, so a retrained model never hits a stale
entry. Entries are safetensors files written atomically (temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evomerge.io.file_modes import file_mode

_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("EVOMERGE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "evomerge"


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every safetensors file of a model directory."""
    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        digest.update(path.name.encode())
        digest.update(_file_hash(path).encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _FINGERPRINTS.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        cached = _FINGERPRINTS[key] = digest.hexdigest()
    return cached


def entry_key(**parts: object) -> str:
    """A stable key from named parts (fingerprints, settings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class StatisticsCache:
    """`get(kind, key)` / `put(kind, key, tensors)` under `root/kind/key.safetensors`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        hit = self._memory.get((kind, key))
        if hit is not None:
            return hit
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a torn or foreign file is a miss, recomputed and replaced
            return None
        self._memory[(kind, key)] = tensors
        return tensors

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, file_mode())  # safetensors creates it 0600
        os.replace(tmp, path)
        self._memory[(kind, key)] = tensors


_CACHES: dict[Path, StatisticsCache] = {}


def statistics_cache(configured: str | None) -> StatisticsCache:
    """One cache object per root per process (so a search also reuses entries in memory)."""
    root = cache_root(configured).resolve()
    if root not in _CACHES:
        _CACHES[root] = StatisticsCache(root)
    return _CACHES[root]
