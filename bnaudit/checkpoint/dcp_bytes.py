"""A DCP non-tensor item that is not a zip, scanned as torch.load reads it, in bounded memory.

torch.distributed.checkpoint.load hands every byte item (whatever its first byte or size) to
``torch.load(weights_only=False)`` as a BytesIO, so torch takes the legacy path for anything that is not a
zip: it unpickles the first pickle (any protocol) and, when that is the legacy magic number, the protocol,
sys_info, main and storage key pickles after it. Each of those may run a payload, so each is scanned; the
item is streamed from its file window, never read whole.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.bytesource import close, open_read, pread
from bnaudit.checkpoint.legacy import LEGACY_MAGIC
from bnaudit.checkpoint.types import GlobalRef
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load

_AFTER_MAGIC = ("protocol version pickle", "sys_info pickle", "main pickle", "storage key list")


class _Window(io.RawIOBase):
    """``length`` bytes of a file from ``offset``, read with pread (the file's position is not used)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._pos, self._end = fd, offset, offset + length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = pread(self._fd, min(len(buffer), self._end - self._pos), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def scan_bytes_item(
    path: Path, offset: int, length: int, *, display: str, source: str
) -> tuple[bool, Any, list[GlobalRef], list[str]]:
    """Scan a non-zip byte item's pickles as torch.load would unpickle them.

    Args:
        path: the ``*.distcp`` file.
        offset: where the item starts in it.
        length: its length.
        display: the folder, for messages.
        source: the item's label, recorded in each GlobalRef.

    Returns:
        (is a pickle, the object torch.load would return, globals, warnings); not a pickle (nothing that
        torch.load could run) gives (False, None, [], []).

    Raises:
        CorruptPickleError: a pickle breaks off after naming globals (they are carried).
    """
    fd = open_read(path)
    try:
        stream = io.BufferedReader(_Window(fd, offset, length))
        try:
            root, found, warnings = inert_load(stream, display=display, source=source)
        except CorruptPickleError as exc:
            if exc.globals:
                raise
            return False, None, [], []
        if not (isinstance(root, int) and root == LEGACY_MAGIC):
            return True, root, found, warnings
        for what in _AFTER_MAGIC:
            try:
                obj, refs, more = inert_load(stream, display=display, source=f"{source} ({what})")
            except CorruptPickleError as exc:
                exc.globals = (*found, *exc.globals)
                raise
            found.extend(r for r in refs if r not in found)
            warnings.extend(more)
            root = obj if what == "main pickle" else root
        return True, root, found, warnings
    finally:
        close(fd)
