"""The README's Python blocks run as written (the docs must not drift from the code)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quickstart():
    assert _python_blocks(), "README.md has no ```python block"


@pytest.mark.parametrize("i", range(len(_python_blocks())))
def test_readme_python_block_runs(i, capsys):
    exec(compile(_python_blocks()[i], f"README.md block {i}", "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    cmd = re.search(r"(python -m pytest[^\n`]*)", README.read_text()).group(1).strip()
    assert cmd in ci


def test_ci_also_runs_it_in_a_fresh_venv_without_cupy_or_upgrades():
    """The README's install + test command as a new CPU-only user runs them: a second,
    fresh venv where only `.[test]` is installed (no CuPy, no pip/setuptools/wheel
    upgrade), so a test that needs more than the test extra brings fails in CI."""
    ci = (README.parent / ".ci" / "run").read_text()
    tail = ci[ci.index("python3 -m venv .venv-ci-nocupy"):]
    assert '.venv-ci-nocupy/bin/pip install -q -e ".[test]"' in tail
    assert ".venv-ci-nocupy/bin/python -m pytest -q" in tail
    assert "cupy" not in tail.split("pip install", 1)[1].split("\n", 1)[0]
    assert "--upgrade" not in tail
