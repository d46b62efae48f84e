"""A cheap content fingerprint of a model directory, for noticing that a run's sources changed.

Hashing every byte of three 7B models on each resume would take minutes, so the fingerprint reads
config.json, every safetensors header (names, shapes, dtypes, offsets) and 16 blocks of 4 KiB
spread over each weight file. A model retrained or replaced under the same path changes its
weights everywhere, so a sampled block differs; a copy (new path, new mtime, same bytes) does not.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

BLOCKS = 16
BLOCK_BYTES = 4096


def sampled_fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            raw = handle.read(8)
            header = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            digest.update(handle.read(min(header, size)))
            for i in range(BLOCKS):
                handle.seek(size * i // BLOCKS)
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()[:32]
