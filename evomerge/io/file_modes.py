"""Modes of what evomerge writes: what the user's umask asks for, like any other tool.

`tempfile.mkstemp` creates files with mode 0600 whatever the umask, and so does safetensors'
`save_file` (also under transformers' `save_pretrained`). Such files would be unreadable to the
group and to others even under umask 022; these helpers give them the mode a plain
`open(path, "w")` (0666 & ~umask) or `mkdir` (0777 & ~umask) would have given.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask. Reading it means setting it for a moment: the probe value 0o077 is the
    strictest, so a file another thread creates in between is never more open than intended."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def apply_umask(root: Path) -> None:
    """Give `root` and every folder and file under it (symlinks aside) the umask's modes: for trees
    that other libraries wrote. Nothing in such a tree is executable."""
    files, dirs = file_mode(), dir_mode()
    for directory, _, names in os.walk(root):
        os.chmod(directory, dirs)
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, files)
