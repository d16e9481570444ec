"""Running a model-based command on one process, under torchrun, or on ``--nproc`` local workers."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnaudit.live.passes import CalibrationSpec


def build_spec(params: dict[str, Any], eval_spec: str | None = None) -> CalibrationSpec:
    """A CalibrationSpec from the parsed model options (see ``cli/model_options.py``)."""
    from bnaudit.live.passes import CalibrationSpec
    from bnaudit.live.specs import parse_kv

    return CalibrationSpec(
        model=params["model_spec"],
        data=params["data_spec"],
        model_kwargs=parse_kv(params["model_args"], "--model-arg"),
        data_kwargs=parse_kv(params["data_args"], "--data-arg"),
        batch_size=params["batch_size"],
        input_index=params["input_index"],
        input_key=params["input_key"],
        forward=params["forward_spec"],
        max_batches=params["max_batches"],
        max_samples=params["max_samples"],
        device=params["device"],
        prefix=params["prefix"],
        method=params["method"],
        stop_after_last_bn=not params["full_forward"],
        eval=eval_spec,
        channels_last=params["channels_last"],
        amp=params["amp"],
        amp_dtype=params["amp_dtype"],
    )


def in_worker() -> bool:
    """True inside a torchrun / --nproc worker of a group with several processes."""
    # From bnaudit.live.launch, not bnaudit.live.distributed: a --nproc launcher never imports torch.
    from bnaudit.live.launch import env_world_size

    return env_world_size() > 1


def is_rank_zero() -> bool:
    """True in a single process and on rank 0 of a group (the one that writes and prints)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def process_group(device: str | None) -> Iterator[None]:
    """Join torchrun's process group for the duration of a command (nothing for a single process)."""
    from bnaudit.live.distributed import destroy_on_exit, init_from_env

    ctx = init_from_env(device) if in_worker() else None
    with destroy_on_exit(ctx):
        yield


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def worker_main(argv: list[str]) -> int:
    """Entry of a ``--nproc`` worker: run the same command line in this process; return its exit code."""
    from bnaudit.cli import cli

    code = cli.main(args=argv, prog_name="bnaudit", standalone_mode=False)
    sys.stdout.flush()
    return int(code or 0)


def launch_workers(nproc: int) -> int:
    """Re-run this command line on ``nproc`` local workers (:mod:`bnaudit.live.launch`); rank 0's exit code.

    Errors raised by a worker come back as the same BnauditError (message and exit code), so bnaudit's
    one-line errors and exit codes survive, unlike a plain ``torchrun``.
    """
    from bnaudit.live.launch import launch_local

    argv = _strip_nproc(sys.argv[1:])
    codes = launch_local(nproc, worker_main, (argv,))
    return int(codes.get(0, 0))
