"""Run a merge plan into a sink: one job at a time, fp32 math, cast at the end.

    plan = plan_merge(recipe, ModelCatalog([recipe_dir]))
    run_plan(plan, FileSink(out_dir), source=CheckpointSource(plan))

`TensorSource` gives input tensors (files here; resident tensors in a search worker) and
`TensorSink` takes output tensors (files here; a resident `nn.Module` in a search worker).
`compute_tensor` is the single place where a job becomes a tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import (
    TAGALONG_FILES,
    TOKENIZER_FILES,
    AtomicDirectory,
    CheckpointReader,
    StreamingShardWriter,
    TensorEntry,
    copy_files,
    shard_file_names,
    shard_layout,
    write_index,
)
from evomerge.merge.jobs import MergePlan, TensorJob, TensorRef
from evomerge.merge.methods.base import DeltaCache, MethodCall
from evomerge.merge.recipe import dump_recipe
from evomerge.merge.vocabulary import AlignedTensors

RECIPE_FILE = "mergekit_config.yml"


class TensorSource(Protocol):
    """Where input tensors come from."""

    def get(self, ref: TensorRef) -> torch.Tensor: ...


class TensorSink(Protocol):
    """Where output tensors go. `write` is called once per job, in plan order."""

    def begin(self, plan: MergePlan) -> None: ...

    def write(self, job: TensorJob, tensor: torch.Tensor) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class CheckpointSource:
    """Reads input tensors lazily from the plan's model directories, one tensor at a time."""

    fresh_tensors = True  # every get() returns new memory the caller may overwrite
    thread_safe = True  # get() may run in a background thread (positioned reads)

    def __init__(self, plan: MergePlan):
        self._readers = [CheckpointReader(m.path, m.reference) for m in plan.models]
        self._aligned = AlignedTensors(keep=1)  # the vocabulary group being merged (embeddings, then lm_head)

    def get(self, ref: TensorRef) -> torch.Tensor:
        if ref.vocabulary is not None:
            return self._aligned.get(ref, self.get).clone()
        return self._readers[ref.model].get(ref.name)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


def compute_tensor(
    plan: MergePlan,
    job: TensorJob,
    source: TensorSource,
    *,
    device: torch.device | str = "cpu",
    caches: Sequence[DeltaCache | None] = (),
    load_inputs: bool = True,
) -> torch.Tensor:
    """Produce one output tensor (on `device`, in `job.out_dtype`).

    Inputs are rounded to the recipe's `dtype` when it sets one, then upcast to fp32. With
    `caches` (one per input, e.g. resident task vectors) and `load_inputs=False`, the non-base
    inputs are not fetched at all; task-vector methods read the deltas from the caches.
    """

    fresh = getattr(source, "fresh_tensors", False)

    def load(ref: TensorRef, *, owned: bool = False) -> torch.Tensor:
        """Fetch, round to the recipe's `dtype`, move, upcast to fp32. A tensor the method may
        overwrite is never a shared view (safetensors mmap, resident weights)."""
        raw = source.get(ref)
        tensor = raw.to(plan.input_dtype) if plan.input_dtype is not None else raw
        tensor = tensor.to(device=device, dtype=torch.float32)
        shared = not fresh and tensor.data_ptr() == raw.data_ptr()
        return tensor.clone() if owned and shared else tensor

    if plan.method.name == "passthrough" and job.input_params[0].get("scale") is None:
        tensor = source.get(job.inputs[0])  # a pure copy: no fp32 round trip
        if plan.input_dtype is not None:
            tensor = tensor.to(plan.input_dtype)
        return tensor.to(device=device, dtype=job.out_dtype)
    base = load(job.base) if job.base is not None else None
    inputs = [load(ref, owned=True) if load_inputs else None for ref in job.inputs]
    call = MethodCall(
        tensor_name=job.name,
        base=base,
        inputs=inputs,
        input_params=job.input_params,
        params=job.params,
        generators=plan.generators(job, device),
        caches=caches,
        inputs_owned=True,
        context=plan.prepared.for_job(job) if plan.prepared is not None else None,
    )
    result = plan.method.fn(call)
    return result.to(job.out_dtype)


class NonFiniteTensor(EvomergeError):
    """A merged tensor holds NaN or inf (from a source model, or values that overflow)."""


def assert_finite(job: TensorJob, tensor: torch.Tensor) -> None:
    """One reduction per tensor (no copy): its sum is finite exactly when every entry is, short
    of a sum beyond the float32 range, which no real weight tensor reaches."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        raise NonFiniteTensor(
            f"{job.name}: the merged tensor holds NaN or inf values (check the input models and the "
            "recipe's values; `evomerge merge --allow-nonfinite` writes it anyway)"
        )


DeltaCaches = Callable[[TensorJob], "Sequence[DeltaCache] | None"]
"""Resident task-vector data for a job's inputs (None: load the inputs); see `compute_tensor`."""


def run_plan(
    plan: MergePlan,
    sink: TensorSink,
    source: TensorSource,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    caches: DeltaCaches | None = None,
    direct: Callable[[TensorJob], bool] | None = None,
    check_finite: bool = True,
    direct_checks_finite: bool = False,
) -> None:
    """Every job of the plan into the sink; on any exception (Ctrl-C included) the sink aborts.
    With `check_finite`, an output tensor holding NaN or inf stops the merge, naming the tensor.

    `caches` is how an in-memory materializer hands its resident task vectors to the methods;
    `direct(job)` lets it write a job into the sink's own storage with a fused kernel (True:
    written; False: compute the job here as usual). With `direct_checks_finite` it has also checked
    (or raised) what it wrote, so the runner does not read the output again.
    A data-aware method (`extra["prepare"]`) first computes its model-level data (statistics,
    permutations); after that every job is again a pure function of its inputs."""
    prepare = plan.method.extra.get("prepare")
    if prepare is not None and plan.prepared is None:
        plan = dataclasses.replace(plan, prepared=prepare(plan, source, device))
    sink.begin(plan)
    prefetch = _Prefetcher(source) if getattr(source, "thread_safe", False) and caches is None else None
    try:
        with _progress(len(plan.jobs), enabled=progress) as advance:
            for i, job in enumerate(plan.jobs):
                if direct is not None and direct(job):
                    if check_finite and not direct_checks_finite:
                        assert_finite(job, sink.target(job))  # type: ignore[attr-defined]
                    advance(job.name)
                    continue
                job_caches = caches(job) if caches is not None else None
                job_source: TensorSource = source
                if prefetch is not None:
                    job_source = prefetch.current(job)
                    if i + 1 < len(plan.jobs):
                        prefetch.start(plan.jobs[i + 1])
                tensor = compute_tensor(
                    plan, job, job_source, device=device, caches=job_caches or (), load_inputs=job_caches is None
                )
                if check_finite:
                    assert_finite(job, tensor)
                sink.write(job, tensor)
                advance(job.name)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        if prefetch is not None:
            prefetch.close()


class _Prefetcher:
    """Reads the next job's input tensors in a background thread while the current job computes
    (file reads release the GIL). Holds at most one job's inputs ahead."""

    def __init__(self, source: TensorSource):
        from concurrent.futures import ThreadPoolExecutor

        self.source = source
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-prefetch")
        self._pending: dict[TensorRef, Any] = {}

    def start(self, job: TensorJob) -> None:
        refs = ([job.base] if job.base is not None else []) + list(job.inputs)
        self._pending = {ref: self._pool.submit(self.source.get, ref) for ref in refs}

    def current(self, job: TensorJob) -> TensorSource:
        pending, self._pending = self._pending, {}
        return _Prefetched(self.source, pending)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)


class _Prefetched:
    """A job's view of the source: tensors read ahead when there are some, else read now."""

    def __init__(self, source: TensorSource, pending: dict[TensorRef, Any]):
        self.source = source
        self.pending = pending
        self.fresh_tensors = getattr(source, "fresh_tensors", False)

    def get(self, ref: TensorRef) -> torch.Tensor:
        future = self.pending.pop(ref, None)
        return future.result() if future is not None else self.source.get(ref)


@contextlib.contextmanager
def _progress(total: int, *, enabled: bool) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda name: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("merging"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("", total=total)
        yield lambda name: bar.update(task, advance=1, description=name)


class FileSink:
    """A model directory: sharded safetensors (+ index), config, tokenizer, recipe; atomic.

    Shard headers are written before the data, so memory holds the tensor being written, not
    the shard. Nothing appears at `out_dir` until `commit()`.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        max_shard_bytes: int = 2_000_000_000,
        overwrite: bool = False,
        copy_tokenizer: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.copy_tokenizer = copy_tokenizer
        self._tmp: AtomicDirectory | None = None
        self._writers: list[StreamingShardWriter] = []
        self._pool: Any = None
        self._queued: list[Any] = []

    def begin(self, plan: MergePlan) -> None:
        self.plan = plan
        self._tmp = AtomicDirectory(self.out_dir, overwrite=self.overwrite)
        entries = [TensorEntry(j.name, j.shape, j.out_dtype) for j in plan.jobs]
        self._shards = shard_layout(entries, self.max_shard_bytes)
        self._names = shard_file_names(len(self._shards))
        self._current = -1
        self._writer: StreamingShardWriter | None = None
        from concurrent.futures import ThreadPoolExecutor

        # One background writer: the file write of tensor i overlaps the merge of tensor i + 1.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-write")

    def write(self, job: TensorJob, tensor: torch.Tensor) -> None:
        assert self._tmp is not None and self._pool is not None, "begin() first"
        while len(self._queued) >= 2:  # bound the memory held by pending writes
            self._queued.pop(0).result()
        self._queued.append(self._pool.submit(self._write_now, job.name, tensor))

    def _drain(self) -> None:
        while self._queued:
            self._queued.pop(0).result()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _write_now(self, name: str, tensor: torch.Tensor) -> None:
        assert self._tmp is not None
        if self._writer is None or self._writer.complete:
            if self._writer is not None:
                self._writer.close()
            self._current += 1
            self._writer = StreamingShardWriter(
                self._tmp.path / self._names[self._current], self._shards[self._current]
            )
            self._writers.append(self._writer)
        self._writer.write(name, tensor)

    def commit(self) -> None:
        assert self._tmp is not None
        self._drain()
        if self._writer is not None:
            self._writer.close()
        if self._current != len(self._shards) - 1 or (self._writer is not None and not self._writer.complete):
            raise RuntimeError("FileSink.commit: not every planned tensor was written")
        directory = self._tmp.path
        if len(self._shards) > 1:
            write_index(directory, self._shards, self._names)
        _write_json(directory / "config.json", self.plan.out_config)
        plan = self.plan
        if not self.copy_tokenizer:
            pass  # mergekit-yaml --no-copy-tokenizer: weights and config only
        elif plan.vocabulary is not None:
            plan.vocabulary.save(directory)
        else:
            copy_files(plan.models[plan.tokenizer_model].path, directory, TOKENIZER_FILES)
        copy_files(plan.models[plan.donor].path, directory, TAGALONG_FILES)
        (directory / RECIPE_FILE).write_text(dump_recipe(plan.recipe), encoding="utf-8")
        self._tmp.commit()

    def abort(self) -> None:
        for future in self._queued:
            future.cancel()
        with contextlib.suppress(BaseException):
            self._drain()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.close()
        if self._tmp is not None:
            self._tmp.abort()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def describe_plan(plan: MergePlan, *, examples: int = 4) -> list[str]:
    """Human-readable lines for `--dry-run`: models, layers, sizes and a few resolved jobs."""
    lines = [f"method: {plan.method.name}" + (f" (seed {plan.seed})" if plan.method.random else "")]
    for i, model in enumerate(plan.models):
        role = " (donor of config)" if i == plan.donor else ""
        lines.append(
            f"model {i}: {model.reference} -> {model.path} [{model.arch.family}, {model.num_layers} layers]{role}"
        )
    lines.append(f"output: {len(plan.layer_sources)} layers, {len(plan.jobs)} tensors, {plan.total_bytes / 1e6:.1f} MB")
    if plan.vocabulary is not None:
        realigned = sum(any(r is not None and r.vocabulary is not None for r in (j.base, *j.inputs)) for j in plan.jobs)
        lines.append(
            f"vocabulary: {len(plan.vocabulary.tokens)} tokens, {plan.vocabulary.size} rows; "
            f"{realigned} tensor(s) re-indexed by token"
        )
    picks = _example_jobs(plan.jobs, examples)
    for job in picks:
        sources = ", ".join(f"{plan.models[r.model].reference}:{r.name}" for r in job.inputs)
        base = f" base={plan.models[job.base.model].reference}:{job.base.name}" if job.base else ""
        per_model = "; ".join(", ".join(f"{k}={_fmt(v)}" for k, v in p.items()) for p in job.input_params)
        glob = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
        lines.append(
            f"  {job.name} {list(job.shape)} {str(job.out_dtype).removeprefix('torch.')}:{base} "
            f"inputs=[{sources}] per-model=[{per_model}] global=[{glob}]"
        )
    if len(plan.jobs) > len(picks):
        lines.append(f"  ... {len(plan.jobs) - len(picks)} more tensors")
    return lines


def _example_jobs(jobs: Sequence[TensorJob], count: int) -> list[TensorJob]:
    if len(jobs) <= count:
        return list(jobs)
    step = (len(jobs) - 1) / (count - 1)
    return [jobs[round(i * step)] for i in range(count)]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def merge_from_file(
    recipe_path: Path,
    out_dir: Path,
    *,
    seed: int | None = None,
    device: str = "cpu",
    max_shard_size: str = "2GB",
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    allow_nonfinite: bool = False,
    copy_tokenizer: bool = True,
) -> MergePlan:
    """`evomerge merge`: validate, plan, then stream the merge into OUT_DIR (atomically)."""
    from evomerge.io.checkpoint import check_output_dir, parse_size
    from evomerge.merge.jobs import ModelCatalog
    from evomerge.merge.plan import plan_merge
    from evomerge.merge.recipe import load_recipe

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EvomergeError(f"--device: expected cpu or cuda (got {device!r})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError("--device: cuda requested but no CUDA device is available; use --device cpu")
    max_bytes = parse_size(max_shard_size)
    recipe = load_recipe(recipe_path)
    if not dry_run:
        check_output_dir(Path(out_dir), overwrite=overwrite)
    plan = plan_merge(recipe, ModelCatalog([Path(recipe_path).resolve().parent]), seed=seed)
    _refuse_input_as_output(plan, Path(out_dir))
    if dry_run:
        for line in describe_plan(plan):
            echo(line)
        return plan
    source = CheckpointSource(plan)
    try:
        with _terminate_as_interrupt():
            run_plan(
                plan,
                FileSink(out_dir, max_shard_bytes=max_bytes, overwrite=overwrite, copy_tokenizer=copy_tokenizer),
                source,
                device=device,
                progress=progress,
                check_finite=not allow_nonfinite,
            )
    finally:
        source.close()
    return plan


def _refuse_input_as_output(plan: MergePlan, out_dir: Path) -> None:
    """OUT_DIR must not be (or hold) one of the models the recipe reads: --overwrite would replace a
    user's model with a merge of itself."""
    target = out_dir.resolve()
    for info in plan.models:
        source = Path(info.path).resolve()
        if source == target or target in source.parents:
            raise EvomergeError(
                f"OUT_DIR: {out_dir} is where input model {info.reference!r} lives; write the merge to a new folder"
            )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while merging, so the sink removes its temporary directory."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
