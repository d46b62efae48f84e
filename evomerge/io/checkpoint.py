"""Model directories on disk: a lazy safetensors reader and an atomic, streaming, sharded writer.

Reading maps each shard (`safe_open`, mmap) and copies out one tensor at a time. Writing knows
every output tensor's name, shape and dtype from the plan before the first byte, so each shard's
header is written first and tensor bytes are streamed after it as they are merged: memory holds a
few tensors, never a whole shard. Everything goes into a hidden temporary directory beside the
target, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from evomerge.errors import EvomergeError
from evomerge.io.dtypes import canonical_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_TO_DTYPE = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TAGALONG_FILES = ("generation_config.json",)


def parse_dtype(name: str, field: str) -> torch.dtype:
    return DTYPES[canonical_dtype(name, field)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(text: str, field: str = "--max-shard-size") -> int:
    """Bytes from '2GB', '500MB', '1.5GiB', '1000000' (decimal units; *iB are binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not match:
        raise EvomergeError(f"{field}: cannot parse {text!r}; use e.g. 2GB, 500MB or a byte count")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.lower()]
    size = int(float(number) * base**power)
    if size <= 0:
        raise EvomergeError(f"{field}: must be positive (got {text!r})")
    return size


# -- reading -------------------------------------------------------------------------------------


class CheckpointReader:
    """Lazy access to the tensors of one model directory (single or sharded safetensors).

    Headers are parsed once; each tensor is read with one positioned read into fresh memory.
    Unlike a memory map, this keeps pages of tensors already merged out of the process's RSS,
    and the caller owns (and may overwrite) every tensor it gets.
    """

    def __init__(self, model_dir: Path, where: str = "model"):
        self.dir = Path(model_dir)
        self.where = where
        self.config = read_config(self.dir, where)
        self._shard_of = _tensor_locations(self.dir, where)
        self._headers: dict[str, _ShardHeader] = {}
        self._files: dict[str, int] = {}  # shard -> file descriptor
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def _entry(self, name: str) -> tuple[str, dict[str, Any], int]:
        shard = self._shard_of[name]
        header = self._headers.get(shard)
        if header is None:
            header = self._headers[shard] = _read_header(self.dir / shard, self.where)
        try:
            return shard, header.entries[name], header.data_start
        except KeyError:
            raise EvomergeError(f"{self.where}: {name} is listed in the index but missing from {shard}") from None

    def shard_path(self, name: str) -> Path:
        """The safetensors file that holds `name`."""
        return self.dir / self._shard_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)[1]["dtype"]
        if code not in CODE_TO_DTYPE:
            raise EvomergeError(f"{self.where}: tensor {name} has unsupported dtype {code}")
        return CODE_TO_DTYPE[code]

    def get(self, name: str) -> torch.Tensor:
        """The tensor in fresh memory; positioned reads, so several threads may read at once."""
        shard, entry, data_start = self._entry(name)
        begin, end = entry["data_offsets"]
        fd = self._files.get(shard)
        if fd is None:
            with self._lock:
                fd = self._files.get(shard)
                if fd is None:
                    fd = self._files[shard] = os.open(self.dir / shard, os.O_RDONLY)
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], data_start + begin + done)
            if not count:
                raise EvomergeError(f"{self.where}: {self.dir / shard} is truncated (tensor {name})")
            done += count
        return buffer.view(self.dtype(name)).reshape(entry["shape"])

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


@dataclass(frozen=True)
class _ShardHeader:
    entries: dict[str, dict[str, Any]]
    data_start: int


def _read_header(path: Path, where: str) -> _ShardHeader:
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        raise EvomergeError(f"{where}: {path} is not a valid safetensors file") from None
    header.pop("__metadata__", None)
    return _ShardHeader(entries=header, data_start=8 + length)


def read_config(model_dir: Path, where: str) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise EvomergeError(f"{where}: {model_dir} is not a directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvomergeError(f"{where}: {model_dir} has no config.json") from None
    except UnicodeDecodeError:
        raise EvomergeError(f"{where}: {path} is not UTF-8 text; is it a model's config.json?") from None
    except json.JSONDecodeError as exc:
        raise EvomergeError(f"{where}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:  # a folder named config.json, no permission
        raise EvomergeError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise EvomergeError(
            f"{where}: {path} holds a JSON {type(config).__name__}, not an object; is it a model's config.json?"
        )
    return config


def _tensor_locations(model_dir: Path, where: str) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the file headers."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise EvomergeError(f"{where}: {index} is not a valid safetensors index") from None
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).exists()})
        if missing:
            raise EvomergeError(f"{where}: shard {missing[0]} listed in {INDEX_FILE} is missing")
        return dict(weight_map)
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        hint = (
            " (its *.bin files are pickles, which can run code when loaded, so evomerge reads safetensors only; "
            "convert once where you trust the file: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR, safe_serialization=True))"
            if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))
            else ""
        )
        raise EvomergeError(f"{where}: {model_dir} has no *.safetensors weights{hint}")
    locations: dict[str, str] = {}
    for file in files:
        for name in _header_names(model_dir / file, where):
            locations[name] = file
    return locations


def _header_names(path: Path, where: str) -> list[str]:
    return list(_read_header(path, where).entries)


# -- writing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def shard_layout(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive entries packed greedily into shards of at most `max_shard_bytes`
    (a single tensor larger than that gets a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count <= 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class StreamingShardWriter:
    """One safetensors file whose header is written up front; tensors must then arrive in order."""

    def __init__(self, path: Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = path
        self.entries = list(entries)
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for e in self.entries:
            header[e.name] = {
                "dtype": SAFETENSORS_CODES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        self._fh: BinaryIO = open(path, "wb", buffering=8 << 20)  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.entries[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {expected.name} {expected.shape} {expected.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.entries)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


def write_index(directory: Path, shards: Sequence[Sequence[TensorEntry]], names: Sequence[str]) -> None:
    weight_map = {e.name: file for file, shard in zip(names, shards, strict=False) for e in shard}
    total = sum(e.nbytes for shard in shards for e in shard)
    payload = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def copy_files(source_dir: Path, target_dir: Path, names: Iterable[str]) -> list[str]:
    copied = []
    for name in names:
        source = Path(source_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(target_dir) / name)
            copied.append(name)
    return copied


class AtomicDirectory:
    """A temporary sibling directory that becomes `target` only on `commit()`.

    Until then `target` is untouched; `abort()` (or an exception in a `with` block) removes every
    trace. Renames within one parent directory are atomic on POSIX filesystems.
    """

    def __init__(self, target: Path, *, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        check_output_dir(self.target, overwrite=overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_partials(self.target)
        self.path = self.target.parent / f".{self.target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self._done = False

    def commit(self) -> Path:
        if self.target.is_dir() and not any(self.target.iterdir()):
            os.replace(self.path, self.target)  # a rename may replace an empty directory
        elif self.target.exists():
            if not self.overwrite:
                raise EvomergeError(f"OUT_DIR: {self.target} appeared during the merge; not replacing it")
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        self._done = True
        return self.target

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True

    def __enter__(self) -> AtomicDirectory:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def _remove_orphaned_partials(target: Path) -> None:
    """Delete `.NAME.partial-PID-*` siblings left by a killed process (PID no longer running):
    they are never user output, only a merge that did not finish."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def check_output_dir(target: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty directory (or a file) unless asked to."""
    if target.is_file():
        raise EvomergeError(f"OUT_DIR: {target} is a file")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise EvomergeError(f"OUT_DIR: {target} exists and is not empty; pass --overwrite to replace it")
