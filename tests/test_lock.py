"""The lock files pin everything pyproject.toml asks for, within its ranges, and this environment
was installed from them (skipped by scripts/test-latest, which tests the newest releases instead)."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from evomerge.io.paths import REPO_ROOT

LOCKS = REPO_ROOT / "requirements"


def pins(name: str) -> dict[str, str]:
    text = (LOCKS / name).read_text()
    return {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M)}


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("lock,groups", [("lock.txt", ["dependencies"]), ("test-lock.txt", ["dependencies", "test"])])
def test_every_requirement_is_pinned_within_its_range(lock: str, groups: list[str]) -> None:
    pinned = pins(lock)
    meta = project()
    requirements = [*meta["dependencies"], *(meta["optional-dependencies"]["test"] if "test" in groups else [])]
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pinned, "torch is installed first, by hand, in the build the machine needs"
            continue
        assert name in pinned, f"{lock}: {req.name} is not pinned (run scripts/lock)"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{lock}: {name}=={pinned[name]} not in {req}"


def test_every_pin_has_hashes_and_the_two_locks_agree() -> None:
    for lock in ("lock.txt", "test-lock.txt"):
        blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", (LOCKS / lock).read_text())
        assert all("--hash=sha256:" in b for b in blocks[1:]), f"{lock}: a pin without hashes"
    runtime, test = pins("lock.txt"), pins("test-lock.txt")
    assert {n: test.get(n) for n in runtime} == runtime


@pytest.mark.skipif(bool(os.environ.get("EVOMERGE_UNLOCKED")), reason="scripts/test-latest installs unpinned")
def test_this_environment_is_the_locked_one() -> None:
    wrong = {}
    for name, pinned in pins("test-lock.txt").items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (installed, pinned)
    assert not wrong, f"installed != locked (install with the README's commands): {wrong}"
