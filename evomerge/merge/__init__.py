"""The merge core: recipe schema, validation, the planner, the merge runner and its sinks, the
method registry (`methods/`) and the data-aware pre-passes (`data_aware/`).

May import: `evomerge.io` (and `evomerge.errors`). It knows nothing of candidates, scoring,
workers or the search; both sinks (a model directory, a resident model) are fed from here.

`from evomerge.merge import CheckpointSource, FileSink, compute_tensor, run_plan, merge_from_file`
is the documented API (docs/merge.md); the names are looked up on first use so that importing a
torch-free module of this package (`recipe`, `method_summaries`) does not import torch.
"""

from __future__ import annotations

from typing import Any

_API = {
    "CheckpointSource",
    "FileSink",
    "TensorSink",
    "TensorSource",
    "compute_tensor",
    "describe_plan",
    "merge_from_file",
    "run_plan",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        from evomerge.merge import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'evomerge.merge' has no attribute {name!r}")
