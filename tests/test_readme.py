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
