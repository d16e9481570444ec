"""Ending a finished bnaudit process without the interpreter's teardown.

When a command has finished, every output has been written atomically and closed. What the interpreter does
after that — destroying every module and object one by one, then the C++ static destructors of loaded
libraries — changes nothing on disk but costs time: ~30 ms for a torch-free ``compare``, and 0.6-0.8 s for
any process that imported torch (measured on 2 cores; see BENCHMARKS.md). That is paid once per
``recalibrate`` and once per ``--nproc`` worker, after the work.

So a finished process runs what it registered to run at exit (``atexit``: logging's flush, multiprocessing's
cleanup of daemonic children such as DataLoader workers, temporary-directory finalizers, torch's own exit
hooks), flushes its streams, and leaves with ``os._exit``. A process that still runs another non-daemon
thread (one a user's model or data module started) exits normally, so that thread is waited for as usual.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def _other_threads_running() -> bool:
    main = threading.main_thread()
    return any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())


def _flush_c_streams() -> None:
    """Flush C stdio buffers (native libraries may print through them); only when ctypes is loaded anyway."""
    if "ctypes" not in sys.modules:
        return
    import ctypes

    # No C library handle on this platform: nothing buffered there to lose.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` after the exit handlers and a flush of every stream, skipping interpreter teardown.

    Falls back to a normal ``sys.exit`` while another non-daemon thread runs. A reader that went away
    (``bnaudit ... | head``) turns a 0 into 1, as :func:`bnaudit.cli.main` reports a broken pipe.
    """
    if _other_threads_running():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            code = code or 1
        except (OSError, ValueError, AttributeError):  # closed or replaced stream: nothing to flush
            pass
    _flush_c_streams()
    os._exit(code)
