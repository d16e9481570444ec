"""The command line starts light: loading it imports neither NumPy nor torch (each command loads its library)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_the_command_line_loads_without_numpy_or_torch() -> None:
    probe = "import sys, bnaudit.cli; print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
