"""Option bundles: a command receives its grouped options as one dataclass instance."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from bnaudit.cli.bundles import option_bundle


@dataclass(frozen=True)
class Pair:
    left: int = 0
    right: str = "r"


PAIR_OPTIONS = (click.option("--left", type=int, default=1), click.option("--right", default="x"))


def test_bundle_reaches_the_command_as_one_instance() -> None:
    seen: list[object] = []

    @click.command()
    @click.option("--other", default="o")
    @option_bundle(Pair, "pair", PAIR_OPTIONS)
    def command(other: str, pair: Pair) -> None:
        seen.append((other, pair))

    result = CliRunner().invoke(command, ["--left", "5", "--other", "z"])
    assert result.exit_code == 0, result.output
    assert seen == [("z", Pair(left=5, right="x"))]
    assert "--left" in CliRunner().invoke(command, ["--help"]).output


def test_an_option_that_is_not_a_field_is_refused() -> None:
    with pytest.raises(TypeError, match="not fields of Pair"):
        option_bundle(Pair, "pair", (click.option("--lefty"),))(lambda pair: None)


def test_an_option_that_never_reaches_the_command_needs_no_field() -> None:
    seen: list[object] = []
    hidden = click.option("--hidden", expose_value=False, default="h")

    @click.command()
    @option_bundle(Pair, "pair", (*PAIR_OPTIONS, hidden))
    def command(pair: Pair) -> None:
        seen.append(pair)

    assert CliRunner().invoke(command, ["--hidden", "x"]).exit_code == 0
    assert seen == [Pair(left=1, right="x")]
