"""Rewrite the golden outputs from the current code: ``python tests/golden/regenerate.py``.

Run it only when a report is meant to change, and review the diff of ``tests/golden/outputs/``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.golden.cases import CASES, GOLDEN, run_case


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            (GOLDEN / f"{case.name}.txt").write_text(run_case(case, Path(tmp)))
        print(case.name)


if __name__ == "__main__":
    main()
