"""Running a model-based command on ``--nproc`` local workers: each worker re-runs the same command line."""

from __future__ import annotations

import click

from bnaudit.live.launch import is_worker, relaunch_command_line

# Where the group puts the function a worker runs the command line with (``bnaudit.cli.worker_main``): the
# commands cannot import the group that imports them.
WORKER_ENTRY_KEY = "bnaudit.worker_entry"


def launch_if_asked(nproc: int) -> int | None:
    """With ``--nproc N > 1`` outside a worker: run this command on N local workers, rank 0's exit code.

    None otherwise (a single process, or already a worker): the command runs here. Call it before importing
    torch, so that the workers can be forked.
    """
    if nproc <= 1 or is_worker():
        return None
    entry = click.get_current_context().meta[WORKER_ENTRY_KEY]
    return relaunch_command_line(nproc, entry)
