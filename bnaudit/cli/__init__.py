"""The ``bnaudit`` command line: a Click group whose commands live one per module."""

from __future__ import annotations

import logging
import sys
import traceback

import click

from bnaudit import __version__
from bnaudit.cli.compare_cmd import compare_command
from bnaudit.cli.inspect_cmd import inspect_command
from bnaudit.errors import BnauditError

EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
ISSUES_URL = "the bnaudit issue tracker"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bnaudit", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
def cli(debug: bool, quiet: bool) -> None:
    """Audit and repair BatchNorm running statistics in PyTorch checkpoints.

    Exit codes: 0 pass, 1 the gate failed (a finding at or above --fail-on), 2 usage or input error,
    3 internal error, 130 interrupted.
    """
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(
        level=level, format="bnaudit: %(levelname)s: %(message)s", stream=sys.stderr, force=True
    )


cli.add_command(inspect_command)
cli.add_command(compare_command)


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the command line and exit with bnaudit's exit code (never a traceback unless --debug)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="bnaudit", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("bnaudit: interrupted; nothing was written", EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BnauditError as exc:
        if debug:
            traceback.print_exc()
        _fail(f"bnaudit: error: {exc}", exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _fail(
            f"bnaudit: internal error: {type(exc).__name__}: {exc}. This is a bug in bnaudit: please "
            f"report it to {ISSUES_URL} (rerun with --debug for the traceback)",
            EXIT_INTERNAL,
        )
    sys.exit(code if isinstance(code, int) else 0)
