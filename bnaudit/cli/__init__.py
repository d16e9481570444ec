"""The ``bnaudit`` command line: a Click group whose commands live one per module."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import click

from bnaudit import __version__
from bnaudit.cli.average_cmd import average_command
from bnaudit.cli.calibration_run import WORKER_ENTRY_KEY
from bnaudit.cli.compare_cmd import compare_command
from bnaudit.cli.config_cmd import apply_config, config_command
from bnaudit.cli.diff_cmd import diff_command
from bnaudit.cli.drift_cmd import drift_command
from bnaudit.cli.inspect_cmd import inspect_command
from bnaudit.cli.recalibrate_cmd import recalibrate_command
from bnaudit.errors import BnauditError
from bnaudit.optional import MissingDependencyError, missing_optional
from bnaudit.temp_registry import Terminated, die_of

EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
ISSUES_URL = "the bnaudit issue tracker"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bnaudit", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Read settings from FILE (a bnaudit.toml, or a pyproject.toml's [tool.bnaudit]) instead of the "
    "nearest bnaudit.toml / pyproject.toml.",
)
@click.option(
    "--no-config", is_flag=True, help="Ignore configuration files: defaults and the command line only."
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, config_file: Path | None, no_config: bool) -> None:
    """Audit and repair BatchNorm running statistics in PyTorch checkpoints.

    Exit codes: 0 pass, 1 the gate failed (a finding at or above --fail-on), 2 usage or input error
    (including a bad [tool.bnaudit] setting), 3 internal error, 130 interrupted.
    """
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(
        level=level, format="bnaudit: %(levelname)s: %(message)s", stream=sys.stderr, force=True
    )
    # Settings from the file become the commands' defaults, so the command line overrides them.
    apply_config(ctx, config_file, no_config)
    ctx.meta[WORKER_ENTRY_KEY] = worker_main


cli.add_command(inspect_command)
cli.add_command(compare_command)
cli.add_command(average_command)
cli.add_command(recalibrate_command)
cli.add_command(drift_command)
cli.add_command(diff_command)
cli.add_command(config_command)


def worker_main(argv: list[str]) -> int:
    """Entry of a ``--nproc`` worker: run the same command line in this process; return its exit code."""
    code = cli.main(args=argv, prog_name="bnaudit", standalone_mode=False)
    sys.stdout.flush()
    return int(code or 0)


def _fail(message: str, code: int) -> None:
    # One write for text and newline: ranks of a torchrun job share stderr and must not interleave.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    sys.exit(code)


def _written_before_interrupt() -> str:
    from bnaudit.atomic_output import committed_outputs  # light: no NumPy

    done = committed_outputs()
    if not done:
        return "nothing was written"
    return f"wrote {', '.join(map(str, done))} (complete) before the interrupt; nothing else was written"


def main(argv: list[str] | None = None) -> None:
    """Run the command line and exit with bnaudit's exit code (never a traceback unless --debug)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="bnaudit", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail(f"bnaudit: interrupted; {_written_before_interrupt()}", EXIT_INTERRUPTED)
    except Terminated as exc:  # SIGTERM/SIGHUP during a remote write, its cleanup done: die of the signal
        sys.stderr.write(f"bnaudit: terminated; {_written_before_interrupt()}\n")
        sys.stderr.flush()
        die_of(exc.signum)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BnauditError as exc:
        if debug:
            traceback.print_exc()
        _fail(f"bnaudit: error: {exc}", exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except ImportError as exc:
        _missing_dependency(exc, debug)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _internal_error(exc)
    sys.exit(code if isinstance(code, int) else 0)


def _internal_error(exc: BaseException) -> None:
    _fail(
        f"bnaudit: internal error: {type(exc).__name__}: {exc}. This is a bug in bnaudit: please "
        f"report it to {ISSUES_URL} (rerun with --debug for the traceback)",
        EXIT_INTERNAL,
    )


def _missing_dependency(exc: ImportError, debug: bool) -> None:
    """An optional dependency that failed to import inside a command: exit 2 with its install command (the
    commands check first; this covers one that is installed but broken). Any other ImportError is a bug."""
    if debug:
        traceback.print_exc()
    module = missing_optional(exc)
    if module is None:
        _internal_error(exc)
        return
    error = MissingDependencyError(module, where=f"import {exc.name}")
    _fail(f"bnaudit: error: {error} ({type(exc).__name__}: {exc})", error.exit_code)


def run() -> None:
    """The console entry point (``bnaudit``, ``python -m bnaudit``): :func:`main`, then a prompt exit.

    Once a command has finished, every output is written and closed, so the process leaves through
    :func:`bnaudit.process_exit.exit_now`: exit handlers and a flush, without the interpreter's teardown
    (~30 ms of a ~0.4 s ``compare``; 0.6-0.8 s for any run that imported torch).
    """
    from bnaudit.process_exit import exit_now

    try:
        main()
    except SystemExit as exc:
        if not (exc.code is None or isinstance(exc.code, int)):
            raise
        exit_now(exc.code or 0)
    exit_now(0)
