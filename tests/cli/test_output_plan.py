"""Pairing each --format with its -o file, and the usage errors that name the option and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnaudit.cli.output_plan import pair_formats
from bnaudit.errors import UsageError
from bnaudit.report import OutputFormat


def test_formats_and_files_pair_in_order() -> None:
    pairs = pair_formats(["json", "sarif"], [Path("r.json"), Path("r.sarif")])
    assert pairs == [(OutputFormat.JSON, Path("r.json")), (OutputFormat.SARIF, Path("r.sarif"))]


def test_no_format_is_the_table_on_stdout() -> None:
    assert pair_formats([], []) == [(OutputFormat.TABLE, None)]


def test_a_dash_is_stdout() -> None:
    assert pair_formats(["json"], [Path("-")]) == [(OutputFormat.JSON, None)]


def test_the_command_line_order_says_which_format_goes_to_stdout() -> None:
    order = ["output_format", "output_format", "output"]  # --format github --format sarif -o r.sarif
    pairs = pair_formats(["github", "sarif"], [Path("r.sarif")], order)
    assert pairs == [(OutputFormat.GITHUB, None), (OutputFormat.SARIF, Path("r.sarif"))]


def test_without_the_order_the_last_format_goes_to_stdout() -> None:
    pairs = pair_formats(["sarif", "github"], [Path("r.sarif")])
    assert pairs == [(OutputFormat.SARIF, Path("r.sarif")), (OutputFormat.GITHUB, None)]


@pytest.mark.parametrize(
    ("formats", "outputs", "where", "fix"),
    [
        (["json"], ["a.json", "b.json"], None, "give a --format for each -o"),
        (["json", "sarif"], [], "--format", "give all but one a -o FILE"),
        (["json", "sarif"], ["r.json", "r.json"], "-o", "give each report its own file"),
        (["github"], ["r.sarif"], "-o", "each -o belongs to the --format before it"),
    ],
)
def test_usage_errors_name_the_option_and_the_fix(
    formats: list[str], outputs: list[str], where: str | None, fix: str
) -> None:
    with pytest.raises(UsageError) as exc:
        pair_formats(formats, [Path(o) for o in outputs])
    assert exc.value.fields.where == where
    assert exc.value.fields.path == (outputs[0] if where == "-o" else None)
    assert exc.value.fields.fix is not None and exc.value.fields.fix.startswith(fix)


def test_two_files_after_one_format_are_refused() -> None:
    # --format json -o a.json -o b.json --format sarif --format github
    order = ["output_format", "output", "output", "output_format", "output_format"]
    with pytest.raises(UsageError) as exc:
        pair_formats(["json", "sarif", "github"], [Path("a.json"), Path("b.json")], order)
    assert exc.value.fields.where == "-o" and exc.value.fields.fix == "give one --format per -o"
