"""The README's quick start and CI must stay in step: CI runs exactly the README's test command."""

from __future__ import annotations

import re

from evomerge.io.paths import REPO_ROOT


def quick_start_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_is_exactly_two_one_line_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    block = ci.split("# TEST-COMMAND-BEGIN\n", 1)[1].split("# TEST-COMMAND-END", 1)[0].strip()
    assert block == quick_start_commands()[1]


def test_torch_is_installed_before_the_project() -> None:
    first = quick_start_commands()[0]
    assert first.index('"torch==2.13.0"') < first.index("requirements/lock.txt") < first.index("-e .")
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert ci.index('pip install "torch==2.13.0"') < ci.index("-r requirements/test-lock.txt") < ci.index("-e .")
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.3"' in pyproject and "torch==" not in pyproject
