"""The temporary files bnaudit has open, and their removal whatever ends the process.

:class:`bnaudit.atomic_output.AtomicOutput` registers each temp file here. Leaving its with block removes
them; what escapes the block is removed too: SIGTERM and SIGHUP (which would kill the process without
running any ``finally``) by a handler that removes them and then dies of the signal as before, and an
exception that ends the process by an exit handler. SIGINT needs nothing: it raises KeyboardInterrupt,
which leaves the with block. During a remote write (:func:`signals_raise`) SIGTERM and SIGHUP are raised as
:class:`Terminated` instead, so that the upload is aborted before the process dies. The few system calls
that create and register a temp file, and those that rename an output and its companions into place, run
with the three signals held back (noted, then raised), so that an interrupt never finds a temp file
unregistered or an output without its sidecar.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

# Temp files still open in this process. Set operations are atomic under the GIL, and a lock could deadlock
# a handler that interrupts its holder.
LIVE_TEMPS: set[Path] = set()
# The handler each signal had before ours, called (or restored) once the temp files are gone.
_PREVIOUS_HANDLERS: dict[int, Any] = {}
_FATAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_DEFERRED_SIGNALS = (signal.SIGINT, *_FATAL_SIGNALS)


def remove_live_temps() -> None:
    """Remove every registered temp file or folder (errors ignored: this runs while the process ends)."""
    for tmp in list(LIVE_TEMPS):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)  # a folder output being built (atomic_folder.py)
            continue
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    LIVE_TEMPS.clear()


class Terminated(BaseException):
    """SIGTERM/SIGHUP received while a remote write runs (:func:`signals_raise`): unwind, then die of it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


# Remote writes under way (signals_raise), and the fatal signal already turned into Terminated, if any.
_RAISING = [0]
_TERMINATING: list[int] = []


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While objects are written to a remote store, SIGTERM/SIGHUP raise :class:`Terminated` in the main
    thread (as SIGINT raises KeyboardInterrupt), so that the writer's own cleanup runs: the multipart upload
    aborted, the temporary object deleted. The first signal is raised; later ones, during that cleanup,
    are not (a second raise would cut it short). The caller ends the process with :func:`die_of` (the CLI
    does; a library caller that lets it escape ends with Python's exit for an uncaught exception). Off the
    main thread nothing changes: the signal would be raised in another thread's code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    guard_signals()
    _RAISING[0] += 1
    try:
        yield
    finally:
        _RAISING[0] -= 1


def die_of(signum: int) -> None:
    """Remove what temp files are left and end the process by ``signum`` (its default action)."""
    remove_live_temps()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _on_fatal_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP handler: remove every temp file still open, then die of the signal as before (or,
    during a remote write, raise :class:`Terminated` so that its cleanup runs first)."""
    if _RAISING[0] > 0 or _TERMINATING:
        if not _TERMINATING:
            _TERMINATING.append(signum)
            raise Terminated(signum)
        return  # the cleanup of the first one is under way
    remove_live_temps()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


atexit.register(remove_live_temps)


def guard_signals() -> None:
    """Install the SIGTERM/SIGHUP cleanup once (from the main thread only: Python's rule for handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _FATAL_SIGNALS:
        if signum in _PREVIOUS_HANDLERS:
            continue
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN:
            continue  # the parent asked us to ignore it (nohup): keep it so
        _PREVIOUS_HANDLERS[signum] = previous
        signal.signal(signum, _on_fatal_signal)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back for a few system calls; a signal that came is raised at the end.

    Python runs signal handlers in the main thread whichever thread the kernel delivers to, so the block
    installs handlers that only note a signal (a thread signal mask would not do: NumPy's and torch's
    worker threads would take the signal). Off the main thread, handlers cannot be set: signals are not
    held there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    for signum in _DEFERRED_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is None or handler is signal.SIG_IGN:
            continue  # not Python's to restore, or ignored anyway
        previous[signum] = signal.signal(signum, lambda received, _frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)
