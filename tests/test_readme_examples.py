"""The README's example outputs are what the commands print today (the main command, and drift's)."""

from __future__ import annotations

import re

from tests.conftest import REPO, run_cli

README = (REPO / "README.md").read_text()


def _block_after(marker: str) -> str:
    start = README.index(marker)
    body = README.index("```\n", start) + 4
    return README[body : README.index("```", body)]


def test_the_main_command_prints_the_readme_block():
    shown = _block_after("The second audits the committed fixtures")
    result = run_cli("compare", "fixtures/ddp_nosync_sorted/ckpt_rank*.pt")
    assert result.returncode == 1
    assert result.stdout == shown


def test_the_drift_example_prints_what_the_readme_shows():
    marker = "$ bnaudit drift fixtures/ddp_nosync_sorted/ckpt_rank0.pt"
    block = README[README.index(marker) :]
    block = block[: block.index("```")]
    args = block.splitlines()[0].split()[2:]
    result = run_cli(*args)
    assert result.returncode == 1
    printed = result.stdout.splitlines()
    for line in block.splitlines()[1:]:
        if line.endswith(" ..."):  # an abbreviated finding: its start is printed
            assert any(p.startswith(line[:-4]) for p in printed), line
        else:
            assert line in printed, line
    assert re.search(r"^Cause: ", result.stdout, re.MULTILINE)
