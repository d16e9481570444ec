"""Every file bnaudit writes goes through here: a temp sibling, fsync, rename, folder fsync, full cleanup.

Whether an output may be written at all (never over an input, a checkpoint, or another output of the run)
is :mod:`bnaudit.checkpoint.output_policy`'s decision, made before any work; this module makes the write
itself safe: interrupted, it leaves nothing (:mod:`bnaudit.temp_registry`), and two processes writing
the same output end with one complete file, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from bnaudit.errors import OutputError
from bnaudit.temp_registry import LIVE_TEMPS, guard_signals, signals_deferred

_DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_TEMP_SUFFIX = ".bnaudit-tmp"
# Errors of os.link that mean "this file system has no hard links": fall back to a checked rename.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS})
# Every target this process has renamed into place, in order (what an interrupted run did write).
_COMMITTED: list[Path] = []


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


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder while one output's files are renamed into it.

    Two bnaudit processes that finish the same output at once then rename one after the other, so a
    checkpoint never ends up beside the other process's sidecar. Where locks are unsupported (no fcntl, a
    file system without flock), the renames run unlocked.
    """
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def committed_outputs() -> list[Path]:
    """The files this process has written so far (complete, renamed into place), in order."""
    return list(_COMMITTED)


class DiscardUnlessCommitted:
    """Leaving the with block without ``commit`` discards the temporary output; an OSError becomes the
    one-line OutputError for the target (shared by :class:`AtomicOutput` and the folder output)."""

    target: Path
    _committed: bool

    def discard(self) -> None:
        raise NotImplementedError

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.discard()
        if isinstance(exc, OSError):
            raise disk_error(self.target, exc) from None


class AtomicOutput(DiscardUnlessCommitted):
    """A file written through a temporary sibling and renamed into place by :meth:`commit`.

    Used as a context manager: leaving the block without ``commit`` (an exception, Ctrl-C, SIGTERM) removes
    every temporary file, so the target is either the complete new file or untouched. ``OSError`` raised in
    the block becomes a one-line :class:`OutputError`. New files get the mode ``open()`` would give them.

    Args:
        target: the file to write; its folder must exist.
        replace: whether the target (and each companion) may replace an existing file. Without it the
            commit creates them only if absent — checked under the folder lock and, where the file system
            has hard links, by the link itself — so of two processes writing the same output one wins
            and the other gets an OutputError.
    """

    def __init__(self, target: Path, *, replace: bool = True) -> None:
        self.target = target
        self.folder = output_folder(target)
        self.replace = replace
        guard_signals()
        self.tmp = self._temp_for(target)
        self._companions: list[tuple[Path, Path]] = []
        self._committed = False

    def _temp_for(self, target: Path) -> Path:
        with signals_deferred():  # a temp must never exist unregistered: the handler would miss it
            try:
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=self.folder)
            except OSError as exc:
                raise disk_error(target, exc) from None
            tmp = Path(name)
            LIVE_TEMPS.add(tmp)
        try:
            # mkstemp creates files readable by the owner only; give the output the permissions a plain
            # open() would, as a file written by torch.save or a shell redirection has.
            os.fchmod(fd, _file_mode())
        finally:
            os.close(fd)
        return tmp

    def __enter__(self) -> AtomicOutput:
        return self

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
        """fsync every temporary file, put each in place of its target, then fsync the folder.

        The renames run under the folder lock with interrupts held back, so an output and its companions
        appear together or not at all.

        Raises:
            OutputError: without ``replace``, a target appeared while the output was being written.
        """
        pairs = [(self.tmp, self.target), *self._companions]
        for tmp, _ in pairs:
            _fsync_path(tmp)
        with signals_deferred(), _folder_locked(self.folder):
            if not self.replace:
                self._refuse_existing([target for _, target in pairs])
            placed: list[Path] = []
            try:
                for tmp, target in pairs:
                    self._place(tmp, target)
                    placed.append(target)
            except BaseException:
                for target in placed if not self.replace else []:
                    target.unlink(missing_ok=True)  # created by this commit: undo, all or nothing
                raise
            self._committed = True
            _COMMITTED.extend(placed)
            self._forget()
        _fsync_folder(self.folder)

    def _refuse_existing(self, targets: list[Path]) -> None:
        for target in targets:
            if os.path.lexists(target):
                raise OutputError(
                    "was created by another process while bnaudit was writing it",
                    path=target,
                    fix="nothing was written — pass --force to replace it, or choose another path",
                )

    def _place(self, tmp: Path, target: Path) -> None:
        if self.replace:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)  # fails if the target exists: no other writer can be overwritten
        except FileExistsError:
            self._refuse_existing([target])
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            os.replace(tmp, target)  # no hard links here; the check under the lock stands
            return
        tmp.unlink()

    def discard(self) -> None:
        """Remove every temporary file (safe to call twice)."""
        for tmp in (self.tmp, *(t for t, _ in self._companions)):
            tmp.unlink(missing_ok=True)
        self._forget()

    def _forget(self) -> None:
        LIVE_TEMPS.difference_update((self.tmp, *(t for t, _ in self._companions)))


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
