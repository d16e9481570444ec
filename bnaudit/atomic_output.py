"""Every file bnaudit writes goes through here: a temp sibling, fsync, rename, folder fsync, full cleanup."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from bnaudit.errors import OutputError

_DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_TEMP_SUFFIX = ".bnaudit-tmp"
# Temp files of every AtomicOutput still open in this process: what the SIGTERM handler removes. Set
# operations are atomic under the GIL, and a lock could deadlock a handler that interrupts its holder.
_LIVE_TEMPS: set[Path] = set()
# The SIGTERM handler each signal had before ours, called (or restored) once the temp files are gone.
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def disk_error(path: Path, exc: OSError) -> OutputError:
    """The one-line OutputError for a failed write (disk full, file too large, permissions).

    Args:
        path: the output that could not be written.
        exc: the error the operating system gave.

    Returns:
        The error to raise; it says that nothing was written.
    """
    if exc.errno in _DISK_FULL:
        return OutputError(
            f"the disk is full or the file size limit was reached ({exc.strerror})",
            path=path,
            fix="nothing was written — free space or choose another -o folder",
        )
    return OutputError(
        f"cannot write ({exc.strerror or exc})", path=path, fix="nothing was written — check the folder"
    )


def output_folder(target: Path) -> Path:
    """The folder ``target`` is written in (``.`` for a bare file name)."""
    return target.parent if str(target.parent) else Path(".")


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the renames are done
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without directory fsync: nothing more can be done
    finally:
        os.close(fd)


def _remove_live_temps(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: remove every temp file still open, then die of the signal as before."""
    # No lock here: the handler runs between two bytecodes of the main thread, which may hold it.
    for tmp in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    _LIVE_TEMPS.clear()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _guard_signals() -> None:
    """Install the SIGTERM cleanup once (main thread only; SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread() or signal.SIGTERM in _PREVIOUS_HANDLERS:
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return  # the parent asked us to ignore SIGTERM: keep it so
    _PREVIOUS_HANDLERS[signal.SIGTERM] = previous
    signal.signal(signal.SIGTERM, _remove_live_temps)


class AtomicOutput:
    """A file written through a temporary sibling and renamed into place by :meth:`commit`.

    Used as a context manager: leaving the block without ``commit`` (an exception, Ctrl-C, SIGTERM) removes
    every temporary file, so the target is either the complete new file or untouched. ``OSError`` raised in
    the block becomes a one-line :class:`OutputError`. New files get the mode ``open()`` would give them.

    Args:
        target: the file to write; its folder must exist.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.folder = output_folder(target)
        _guard_signals()
        self.tmp = self._temp_for(target)
        self._companions: list[tuple[Path, Path]] = []
        self._committed = False

    def _temp_for(self, target: Path) -> Path:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=self.folder)
        except OSError as exc:
            raise disk_error(target, exc) from None
        tmp = Path(name)
        _LIVE_TEMPS.add(tmp)
        try:
            # mkstemp creates files readable by the owner only; give the output the permissions a plain
            # open() would, as a file written by torch.save or a shell redirection has.
            os.fchmod(fd, _file_mode())
        finally:
            os.close(fd)
        return tmp

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.discard()
        if isinstance(exc, OSError):
            raise disk_error(self.target, exc) from None

    def write(self, data: bytes) -> None:
        """Write the whole content of the main file (for outputs built in memory)."""
        with open(self.tmp, "wb") as handle:
            handle.write(data)

    def add_companion(self, target: Path, data: str | bytes) -> None:
        """Write a small file now, under a temporary name that :meth:`commit` renames with the main file."""
        tmp = self._temp_for(target)
        self._companions.append((tmp, target))
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)

    def commit(self) -> None:
        """fsync every temporary file, rename each over its target, then fsync the folder."""
        for tmp in (self.tmp, *(t for t, _ in self._companions)):
            _fsync_path(tmp)
        os.replace(self.tmp, self.target)
        for tmp, target in self._companions:
            os.replace(tmp, target)
        self._committed = True
        self._forget()
        _fsync_folder(self.folder)

    def discard(self) -> None:
        """Remove every temporary file (safe to call twice)."""
        for tmp in (self.tmp, *(t for t, _ in self._companions)):
            tmp.unlink(missing_ok=True)
        self._forget()

    def _forget(self) -> None:
        _LIVE_TEMPS.difference_update((self.tmp, *(t for t, _ in self._companions)))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :class:`AtomicOutput`).

    Args:
        path: the output file.
        data: its whole content.

    Raises:
        OutputError: the folder is missing or not writable, or the disk is full; nothing is left behind.
    """
    folder = output_folder(path)
    if not folder.is_dir():
        raise OutputError(
            f"the folder {folder} does not exist", path=path, fix="create it or choose another path"
        )
    with AtomicOutput(path) as staged:
        staged.write(data)
        staged.commit()


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes_atomically`."""
    write_bytes_atomically(path, text.encode("utf-8"))
