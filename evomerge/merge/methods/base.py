"""What every merge method shares: its declared parameters, the call it receives, seeded RNGs.

A method is a pure function `fn(call: MethodCall) -> Tensor` over fp32 tensors. The planner resolves
every parameter (gradients, filters, precedence, defaults) before any tensor is read, so a method
never sees YAML; the same function serves the file sink (`evomerge merge`) and the in-memory sink
(search candidates), which can pass precomputed per-task-vector data through `DeltaCache`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DeltaCache:
    """Precomputed data about one task vector `delta = theta_i - theta_base`, reusable across calls.

    The in-memory materializer builds these once per source model; then a magnitude top-k at any
    density is a threshold lookup in `sorted_abs` instead of a selection over the whole tensor, and
    DELLA needs no per-row sort. Every field is optional except `delta`.
    """

    delta: torch.Tensor  # fp32, same shape as the weight
    sorted_abs: torch.Tensor | None = None  # |delta| flattened, ascending
    row_ranks: torch.Tensor | None = None  # per-row ascending rank of |delta| (DELLA), int64
    # flat indices of a stable ascending sort of |delta| (int32 when they fit): where equal
    # magnitudes straddle a top-k cut, the index at the cut says which of them are kept
    sorted_order: torch.Tensor | None = None

    @classmethod
    def build(cls, delta: torch.Tensor, *, sorted_abs: bool = True, row_ranks: bool = False) -> DeltaCache:
        from evomerge.merge.methods.sparsify import stable_row_ranks

        delta = delta.float()
        return cls(
            delta=delta,
            sorted_abs=delta.abs().reshape(-1).sort().values if sorted_abs else None,
            row_ranks=stable_row_ranks(delta.abs()) if row_ranks else None,
        )


@dataclass
class MethodCall:
    """Everything a method needs for one output tensor; all tensors fp32 on one device.

    `inputs[i]` may be None when `caches[i]` carries the task vector (the base is then required).
    """

    tensor_name: str
    base: torch.Tensor | None
    inputs: Sequence[torch.Tensor | None]
    input_params: Sequence[Mapping[str, Any]]
    params: Mapping[str, Any]
    generators: Sequence[torch.Generator | None] = ()
    caches: Sequence[DeltaCache | None] = ()
    inputs_owned: bool = False  # the caller hands the input tensors over: methods may overwrite them
    # Model-level data a data-aware method's pre-pass computed for this job (statistics, permutations,
    # REPAIR folds); see `MergeMethod.extra["prepare"]` and evomerge.merge.data_aware. None for other methods.
    context: Any = None

    def cache(self, i: int) -> DeltaCache | None:
        return self.caches[i] if i < len(self.caches) else None

    def delta(self, i: int) -> torch.Tensor:
        """Task vector of input i (from the cache when there is one)."""
        cached = self.cache(i)
        if cached is not None:
            return cached.delta
        assert self.base is not None and self.inputs[i] is not None
        return self.inputs[i] - self.base  # type: ignore[operator]

    def take_delta(self, i: int) -> tuple[torch.Tensor, bool]:
        """Task vector i and whether the caller may overwrite it. Owned inputs are turned into
        their task vector in place (input i is consumed); cached deltas are shared, never owned."""
        cached = self.cache(i)
        if cached is not None:
            return cached.delta, False
        assert self.base is not None and self.inputs[i] is not None
        source = self.inputs[i]
        if self.inputs_owned and source.dtype == self.base.dtype:  # type: ignore[union-attr]
            return source.sub_(self.base), True  # type: ignore[union-attr]
        # A copy (upcast first when the input has lower precision: exact, and faster than letting
        # type promotion mix dtypes inside the subtraction).
        return source.to(self.base.dtype, copy=True).sub_(self.base), True  # type: ignore[union-attr]

    def generator(self, i: int) -> torch.Generator:
        if i >= len(self.generators) or self.generators[i] is None:
            raise RuntimeError(f"{self.tensor_name}: random method called without a generator")
        return self.generators[i]  # type: ignore[return-value]


def tensor_seed(merge_seed: int, model_index: int, tensor_name: str) -> int:
    """A 63-bit seed from (merge seed, model, tensor): masks do not depend on execution order."""
    digest = hashlib.blake2b(f"{merge_seed}\0{model_index}\0{tensor_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def make_generator(
    merge_seed: int, model_index: int, tensor_name: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(merge_seed, model_index, tensor_name))
    return generator
