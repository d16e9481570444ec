"""The zip fix-up of the byte-patching writer: rewrite every copy of a patched entry's CRC-32."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from bnaudit.checkpoint.bytesource import close, open_read
from bnaudit.checkpoint.zipdir import ZipFormatError, read_directory
from bnaudit.checkpoint.zipentries import ZipEntry
from bnaudit.checkpoint.zipentries import locate_entries as _locate
from bnaudit.errors import InputError

_CHUNK = 1 << 20
_CRC_BYTES = 4


def locate_entries(path: Path | str) -> dict[str, ZipEntry]:
    """Every entry of a zip archive with all its CRC-32 fields located (central, local, descriptor).

    Args:
        path: the zip file, or an object's URL (read by range requests).

    Returns:
        Entry name -> ZipEntry.

    Raises:
        InputError: a record is missing or inconsistent (the archive is corrupt or unusual).
    """
    fd = open_read(path)
    try:
        return _locate(fd, read_directory(fd, strict=True), descriptors=True)
    except ZipFormatError as exc:
        raise InputError(
            str(exc), path=path, fix="the zip archive is corrupt or uses a layout bnaudit cannot patch"
        ) from None
    finally:
        close(fd)


def crc32_range(fd: int, offset: int, size: int) -> int:
    """CRC-32 of ``size`` bytes at ``offset`` of an open file, read in chunks.

    Raises:
        OSError: the file ends first.
    """
    crc = 0
    done = 0
    while done < size:
        chunk = os.pread(fd, min(_CHUNK, size - done), offset + done)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def rewrite_crc(fd: int, entry: ZipEntry, shift: int = 0) -> int:
    """Recompute an entry's CRC-32 from the data now in the file and write it into every CRC field.

    Args:
        fd: the file, open for reading and writing.
        entry: the entry, located in the file the output was copied from.
        shift: how far the output's bytes are displaced from the located offsets (0 for an in-place copy).

    Returns:
        The new CRC-32.
    """
    crc = crc32_range(fd, entry.data_offset + shift, entry.stored_size)
    packed = crc.to_bytes(_CRC_BYTES, "little")
    for field in entry.crc_fields:
        os.pwrite(fd, packed, field + shift)
    return crc


def stale_crc_entry(fd: int, entries: list[ZipEntry], shift: int = 0) -> str | None:
    """The first entry whose data no longer matches one of its CRC-32 fields, or None when all match."""
    for entry in entries:
        crc = crc32_range(fd, entry.data_offset + shift, entry.stored_size)
        for field in entry.crc_fields:
            if int.from_bytes(os.pread(fd, _CRC_BYTES, field + shift), "little") != crc:
                return entry.name
    return None
