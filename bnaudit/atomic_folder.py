"""A folder output (a repaired sharded or DCP checkpoint) built beside its target and renamed into place.

The folder-level twin of :class:`bnaudit.atomic_output.AtomicOutput`: every file is written into a
temporary sibling folder, each is fsynced, and one rename puts the folder in place, so a reader sees the
whole new folder or nothing. Interrupted, the temporary folder is removed (it is registered with
:mod:`bnaudit.temp_registry`). With ``replace`` an existing target folder is first renamed aside and
removed only once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bnaudit.atomic_output import DiscardUnlessCommitted, _folder_locked, disk_error, output_folder
from bnaudit.errors import OutputError
from bnaudit.temp_registry import LIVE_TEMPS, guard_signals, signals_deferred

_TEMP_SUFFIX = ".bnaudit-tmp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without directory fsync: the renames still stand
    finally:
        os.close(fd)


class AtomicFolder(DiscardUnlessCommitted):
    """A folder written through a temporary sibling folder (``tmp``) and renamed into place by ``commit``.

    Args:
        target: the folder to create; its parent must exist.
        replace: whether an existing ``target`` may be replaced (``--force``, checked by the output policy).
    """

    def __init__(self, target: Path, *, replace: bool = False) -> None:
        self.target = target
        self.parent = output_folder(target)
        self.replace = replace
        guard_signals()
        with signals_deferred():  # never a temp folder that the cleanup does not know
            try:
                name = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=self.parent)
            except OSError as exc:
                raise disk_error(target, exc) from None
            self.tmp = Path(name)
            LIVE_TEMPS.add(self.tmp)
        # mkdtemp makes a folder only its owner can enter; give it the mode os.mkdir would.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o777 & ~mask)
        self._committed = False

    def __enter__(self) -> AtomicFolder:
        return self

    def commit(self) -> None:
        """fsync every file of the temporary folder, then rename it to the target (under the folder lock).

        Raises:
            OutputError: the target exists (without ``replace``), e.g. another process created it meanwhile.
        """
        for root, _dirs, files in os.walk(self.tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
        aside: Path | None = None
        with signals_deferred(), _folder_locked(self.parent):
            if os.path.lexists(self.target):
                if not self.replace:
                    raise OutputError(
                        "already exists (it was created while bnaudit was writing it)",
                        path=self.target,
                        fix="nothing was written — pass --force to replace it, or choose another path",
                    )
                aside = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old.", dir=self.parent))
                LIVE_TEMPS.add(aside)
                os.replace(self.target, aside / self.target.name)
            os.rename(self.tmp, self.target)
            self._committed = True
            LIVE_TEMPS.discard(self.tmp)
        _fsync(self.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            LIVE_TEMPS.discard(aside)

    def discard(self) -> None:
        """Remove the temporary folder and everything in it (safe to call twice)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        LIVE_TEMPS.discard(self.tmp)
