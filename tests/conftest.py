"""Shared fixtures: the shipped mini toy zoo (zoo/mini, seed 0), and one local Ray instance.

Tests use the shipped zoo, not one trained here: another CPU may train different weights, and a
test must not depend on what one machine's training happened to reach (tests/test_zoo.py builds
zoos for real to check that training is deterministic).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def mini_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped mini zoo (base + three experts), verified, then copied so that no test can
    change the repository's files."""
    from evomerge.io.paths import shipped_zoo
    from evomerge.zoo.models import verify_zoo

    verify_zoo(shipped_zoo(mini=True), seed=0, mini=True)
    out = tmp_path_factory.mktemp("zoo") / "mini"
    shutil.copytree(shipped_zoo(mini=True), out)
    return out


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    """One real local Ray instance (2 CPUs, private temp dir, no auth) shared by every Ray test."""
    import logging
    import shutil
    import tempfile

    import ray

    from evomerge.workers.ray_cluster import init_ray

    temp_dir = tempfile.mkdtemp(prefix="evomerge-ray-")
    # Workers inherit the environment Ray starts with: test-only worker factories (search_worker)
    # must import in every later Ray test of the session too, not only in the first one.
    tests_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    init_ray("local", temp_dir=temp_dir, num_cpus=2, logging_level=logging.WARNING)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def vocab_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llamas with locally trained BPE tokenizers, some with added tokens (tests/vocab_models.py)."""
    from vocab_models import vocab_zoo as build

    return build(tmp_path_factory.mktemp("vocab_zoo"))
