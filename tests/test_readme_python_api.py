"""The README's Python API example runs as written, on the committed fixtures."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import FIXTURES, REPO


def _python_api_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the Python API section has no python block"
    return match.group(1)


def test_python_api_example_runs_on_the_fixtures() -> None:
    # The example names ckpt_rank*.pt in the working folder: run it where the fixture ranks are.
    done = subprocess.run(
        [sys.executable, "-c", _python_api_example()],
        cwd=FIXTURES / "ddp_sync",
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "pass"
