"""The code that runs on an executor slot (in process, or inside a Ray actor) around a worker.

It builds the worker from its spec, and turns everything a single candidate can do wrong (raise,
run out of memory, overrun its time, return garbage) into a failed `EvalResult` with a reason, so
that only a dying process can make a call fail. Timing is measured here, next to the work.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from evomerge.workers.candidate import Candidate, EvalResult, WorkerSpec

MAX_REASON_CHARS = 500


class CandidateTimeout(BaseException):  # noqa: N818 - it is a signal, not an error of the worker's own
    """Raised inside `evaluate` when the candidate overruns its time.

    A BaseException so that a worker's own `except Exception` cannot swallow it."""


@dataclass(frozen=True)
class SlotInfo:
    """What a freshly built slot reports: who it is and what building the worker cost."""

    worker: str
    pid: int
    host: str
    setup_seconds: float
    soft_timeouts: bool


def describe_exception(exc: BaseException) -> str:
    """One line, bounded: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return line[:MAX_REASON_CHARS]


def _is_out_of_memory(exc: BaseException) -> bool:
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
    )


def _release_accelerator_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def soft_timeouts_available() -> bool:
    """SIGALRM can interrupt Python code only on the main thread of a POSIX process."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise CandidateTimeout in this thread after `seconds` (no-op when unsupported).

    This interrupts Python code and interruptible sleeps, not a long native call; the Ray executor
    backs it with a hard deadline that kills the actor."""
    if not seconds or seconds <= 0 or not soft_timeouts_available():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise CandidateTimeout(f"evaluation exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class WorkerHost:
    """Owns one worker on one slot; the Ray executor wraps this class in `ray.remote`."""

    def __init__(self, spec: WorkerSpec, worker_id: str, torch_threads: int | None = None):
        started = time.perf_counter()
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.worker = spec.build()
        self.setup_seconds = time.perf_counter() - started

    def info(self) -> SlotInfo:
        return SlotInfo(
            worker=self.worker_id,
            pid=os.getpid(),
            host=socket.gethostname(),
            setup_seconds=self.setup_seconds,
            soft_timeouts=soft_timeouts_available(),
        )

    def evaluate(self, candidate: Candidate, timeout: float | None = None) -> EvalResult:
        """Never raises for a candidate's own failure; the result's fitness is checked by the executor."""
        started = time.perf_counter()
        try:
            with _deadline(timeout):
                result = self.worker.evaluate(candidate)
            if not isinstance(result, EvalResult):
                result = EvalResult.failure(
                    candidate.id, f"worker returned {type(result).__name__}, expected EvalResult"
                )
        except CandidateTimeout as exc:
            result = EvalResult.failure(candidate.id, f"timeout: {exc}")
        except Exception as exc:
            if _is_out_of_memory(exc):
                _release_accelerator_memory()
                result = EvalResult.failure(candidate.id, f"out of memory: {describe_exception(exc)}")
            else:
                result = EvalResult.failure(candidate.id, f"evaluation raised {describe_exception(exc)}")
        result.seconds = time.perf_counter() - started
        result.worker = self.worker_id
        result.attempts = candidate.attempt
        return result
