"""Run a function on N local worker processes that form a torch.distributed group — without importing torch.

``bnaudit recalibrate --nproc N`` uses this instead of torch's own launcher: the launcher only starts the
workers and collects what they return or the error they hit, so it never imports torch. The workers import
it themselves, in parallel. torch's launcher lives in torch, and its import (about 2.5 s on a small
machine) would come on top of the workers' own, before they even start.

Workers get torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, and ``OMP_NUM_THREADS=1`` unless it is set), so the same worker code runs
under ``torchrun`` and here.

On Linux, a launcher that has not imported torch and runs no other thread forks its workers: they start with
bnaudit already imported (a spawned worker first starts an interpreter and imports it again, ~0.3 s) and
leave with ``os._exit``, as forked multiprocessing workers do. Elsewhere, or once torch is loaded (its
threads and OpenMP state do not survive a fork), workers are spawned, and leave through
:func:`bnaudit.process_exit.exit_now` once their result is written.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bnaudit.errors import BnauditError, InternalError, UsageError

# After a rank fails, how long the others get to stop by themselves. They normally leave within a second or
# two (the failing rank posts its error to the group's store and every rank raises it); a rank stuck
# elsewhere is then terminated.
FAILURE_GRACE_S = 30.0
# How long a terminated worker gets before it is killed.
TERMINATE_GRACE_S = 5.0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun, launch_local), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_worker() -> bool:
    """True inside a torchrun / ``--nproc`` worker of a group with several processes."""
    return env_world_size() > 1


def is_rank_zero() -> bool:
    """True in a single process and on rank 0 of a group (the one that writes and prints)."""
    return os.environ.get("RANK", "0") == "0"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (rank 0's store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error_file(folder: str, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.err"


def _result_file(folder: str, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.out"


def start_method() -> str:
    """``fork`` where it is safe (Linux, torch not imported, no other thread), else ``spawn``."""
    if sys.platform == "linux" and "torch" not in sys.modules and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _worker(entry: Callable[..., Any], args: Sequence[Any], folder: str, spawned: bool) -> None:
    """Run ``entry(*args)`` in a worker; its result, or its error as one line, goes to ``folder``."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = entry(*args)
    except BnauditError as exc:
        _error_file(folder, rank).write_text(f"{exc.exit_code}\n{exc}", encoding="utf-8")
        raise SystemExit(exc.exit_code) from None
    except SystemExit:
        raise
    except BaseException as exc:
        _error_file(folder, rank).write_text(
            f"{InternalError.exit_code}\ninternal error on rank {rank}: {type(exc).__name__}: {exc}",
            encoding="utf-8",
        )
        raise
    # The launcher reads this back: a pickle this process wrote into the launcher's private folder.
    _result_file(folder, rank).write_bytes(pickle.dumps(result))
    if spawned:
        # A forked worker already ends with os._exit; a spawned one would tear its interpreter down.
        from bnaudit.process_exit import exit_now

        exit_now(0)


def _read_failure(folder: str, nproc: int, exit_codes: Mapping[int, int | None]) -> BnauditError:
    """The first reported error (by rank), or an InternalError naming the first rank that died silently."""
    for rank in range(nproc):
        path = _error_file(folder, rank)
        if path.is_file():
            code_text, _, line = path.read_text(encoding="utf-8").partition("\n")
            err = BnauditError(line.strip())  # a worker's message, already formatted by its own fields
            err.exit_code = int(code_text)
            return err
    rank, code = min((r, c) for r, c in exit_codes.items() if c != 0)
    return InternalError(f"died (exit code {code}) without reporting an error", where=f"worker rank {rank}")


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started inside, then restore the launcher's own."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        # One thread per worker unless the user chose: N workers on N cores, not N x cores threads.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def _stop(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Terminate the workers still running; kill those that ignore it."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _wait(processes: dict[int, multiprocessing.process.BaseProcess]) -> dict[int, int | None]:
    """Wait for every worker; after the first failure, give the others FAILURE_GRACE_S, then stop them."""
    running = dict(processes)
    failed_at: float | None = None
    while running:
        timeout = None if failed_at is None else max(0.0, failed_at + FAILURE_GRACE_S - time.monotonic())
        ready = multiprocessing.connection.wait([p.sentinel for p in running.values()], timeout)
        if not ready:
            _stop(list(running.values()))
            break
        for rank, proc in list(running.items()):
            if proc.sentinel in ready:
                proc.join()
                del running[rank]
                if proc.exitcode != 0 and failed_at is None:
                    failed_at = time.monotonic()
    return {rank: proc.exitcode for rank, proc in processes.items()}


def launch_local(
    nproc: int, entry: Callable[..., Any], args: Sequence[Any] = (), method: str | None = None
) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``nproc`` local worker processes that form a process group.

    Each worker gets torchrun's environment and should call
    :func:`bnaudit.live.distributed.init_from_env` first.
    ``entry`` must be a module-level function and ``args`` and the return value picklable (spawned workers
    receive them pickled). Ctrl-C stops every worker.

    Args:
        nproc: number of workers (>= 1).
        entry: the worker function; it returns a picklable value (e.g. an exit code) or raises.
        args: positional arguments for ``entry``.
        method: ``"fork"`` or ``"spawn"``; by default :func:`start_method`.

    Returns:
        Each rank's return value, by rank.

    Raises:
        BnauditError: a worker raised one; the first failing rank's message and exit code are kept (what
            ``bnaudit recalibrate`` prints and exits with). A worker that died otherwise gives InternalError.
    """
    if nproc < 1:
        raise UsageError("must be at least 1", where="--nproc", found=str(nproc))
    method = method or start_method()
    if method not in ("fork", "spawn"):
        raise UsageError("must be 'fork' or 'spawn'", where="launch_local method", found=repr(method))
    fork = method == "fork"
    context = multiprocessing.get_context("fork") if fork else multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bnaudit-launch-") as folder:
        processes: dict[int, multiprocessing.process.BaseProcess] = {}
        try:
            for rank in range(nproc):
                worker_args = (entry, list(args), folder, method == "spawn")
                proc = context.Process(target=_worker, args=worker_args, name=f"rank{rank}")
                with _environment(_rank_environment(rank, nproc, port)):
                    proc.start()  # a spawned worker starts with the environment as it is now
                processes[rank] = proc
            exit_codes = _wait(processes)
        except BaseException:
            _stop(list(processes.values()))  # Ctrl-C, or a worker that could not start: leave none behind
            raise
        if any(code != 0 for code in exit_codes.values()):
            raise _read_failure(folder, nproc, exit_codes)
        return {rank: pickle.loads(_result_file(folder, rank).read_bytes()) for rank in range(nproc)}


def _strip_nproc(argv: Sequence[str]) -> list[str]:
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


def relaunch_command_line(nproc: int, entry: Callable[[list[str]], int]) -> int:
    """Re-run this process's command line, without ``--nproc``, as ``entry(argv)`` on ``nproc`` workers.

    Call it before importing torch, so that the workers can be forked (see the module docstring).

    Args:
        nproc: number of workers.
        entry: a module-level function that runs a command line in the worker and returns its exit code.

    Returns:
        Rank 0's exit code.

    Raises:
        BnauditError: as :func:`launch_local`: a worker's error keeps its message and exit code.
    """
    codes = launch_local(nproc, entry, (_strip_nproc(sys.argv[1:]),))
    return int(codes.get(0, 0))
