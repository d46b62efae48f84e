"""Connecting to Ray the way this project needs it, and sizing the actor pool from the cluster.

`--ray-address auto` joins a running cluster untouched. Anything local starts a private instance
with the settings that avoid this machine's known pitfalls: a project-local temp dir (no collisions
between runs), no dashboard, token auth and usage stats off.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TEMP_DIR = Path(".cache") / "ray"
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray puts Unix sockets under the temp dir; their paths must stay under the OS limit (107 bytes).
MAX_TEMP_DIR_CHARS = 60
# Ray forwards every actor's stdout and stderr to the driver, where the progress bars of lm-eval,
# transformers and datasets (tqdm) would tear through the search display. The libraries read these
# when they are imported, so they go into each actor's environment from its start (a cluster's
# workers do not inherit the driver's environment).
QUIET_WORKER_ENV = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
CONNECT_TIMEOUT_S = 5.0


class PoolSizeError(ValueError):
    """The requested number of workers does not fit the cluster."""


def is_local_address(address: str | None) -> bool:
    return address is None or address in ("", "local")


def init_ray(
    address: str | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    **kwargs: Any,
) -> bool:
    """Connect to (`auto` or an address) or start (None / `local`) Ray. Returns True when this call
    started or connected Ray, False when it was already initialized (the caller does not own it)."""
    import ray

    if ray.is_initialized():
        return False
    if not is_local_address(address):
        ray.init(address=address, **kwargs)
        return True
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    temp = Path(temp_dir) if temp_dir is not None else DEFAULT_TEMP_DIR
    temp = temp.resolve()
    if len(str(temp)) > MAX_TEMP_DIR_CHARS:
        raise ValueError(f"Ray temp dir {temp} is too long for Ray's socket paths; pass a shorter one")
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _temp_dir=str(temp),
        **kwargs,
    )
    return True


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the Ray cluster at `address` cannot be joined, or None when its port accepts a connection.

    `ray.init` retries an address nobody listens on for minutes, printing C++ warnings; a plain TCP
    connect answers at once. `auto` is checked through RAY_ADDRESS when that is set; otherwise Ray
    looks for a local cluster itself and fails at once when there is none."""
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if target in ("", "auto"):
        return None
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return None  # not host:port; let Ray judge it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"no Ray cluster answers at {target} ({exc.strerror or type(exc).__name__})"


@contextmanager
def ray_session(address: str | None = None, **kwargs: Any) -> Iterator[None]:
    """`init_ray` for the duration of a block; shuts Ray down only if this block started it."""
    import ray

    owned = init_ray(address, **kwargs)
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


@dataclass(frozen=True)
class PoolPlan:
    """How many actors to start and what each one reserves."""

    n_workers: int
    num_cpus: float
    num_gpus: float
    torch_threads: int | None

    def actor_options(self) -> dict[str, float]:
        options = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        return options


def plan_pool(
    resources: Mapping[str, float],
    n_workers: int | None = None,
    cpus_per_worker: float = 0.5,
    gpus_per_worker: float = 1.0,
) -> PoolPlan:
    """One actor per GPU when the cluster has GPUs, else one per CPU; `n_workers` overrides the count.

    Actors reserve a fraction of a CPU so that plain Ray tasks are never starved behind them (two
    `num_cpus=1` actors on a 2-CPU node leave no slot for a task, which hangs silently). CPU actors run
    torch single-threaded: parallelism comes from actors, and oversubscribed threads collapse (on the
    toy zoo two such actors on two cores evaluate 1.6x as many candidates per hour as one worker,
    docs/evaluation.md). Each actor holds its own copy of the sources, so with large models on CPUs
    cap the count (`--workers`) to what memory allows."""
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 0.0))
    if n_workers is not None and n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}")
    if gpus >= gpus_per_worker > 0:
        count = n_workers if n_workers is not None else int(gpus // gpus_per_worker)
        if count * gpus_per_worker > gpus:
            raise PoolSizeError(f"{count} workers need {count * gpus_per_worker:g} GPUs; the cluster has {gpus:g}")
        return PoolPlan(count, cpus_per_worker, gpus_per_worker, None)
    count = n_workers if n_workers is not None else max(1, int(cpus))
    return PoolPlan(count, cpus_per_worker, 0.0, 1)
