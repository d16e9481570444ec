"""The one zip reader: end records (ZIP64 too), central directory and local headers, into immutable entries.

Every zip signature and record layout is declared here, and this is the one module that locates members:
the torch zip and DCP readers, the writer's CRC-32 fix-ups and the same-layout proof all go through it.
The end records and the directory take one ``pread`` each (:mod:`bnaudit.checkpoint.zipentries` then
reads local headers in runs). Errors are :class:`ZipFormatError`; each caller words them for its purpose.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from bnaudit.checkpoint.bytesource import fd_size, pread

LOCAL_SIGNATURE = b"PK\x03\x04"
CENTRAL_SIGNATURE = b"PK\x01\x02"
END_SIGNATURE = b"PK\x05\x06"
ZIP64_END_SIGNATURE = b"PK\x06\x06"
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
DESCRIPTOR_SIGNATURE = b"PK\x07\x08"

LOCAL = struct.Struct("<4s5H3L2H")  # the 30 fixed bytes of a local header
CENTRAL = struct.Struct("<4s6H3L5H2L")  # the 46 fixed bytes of a central directory record
END = struct.Struct("<4s4H2LH")  # signature, disk numbers, entry counts, directory size and offset, comment
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the ZIP64 end record, disk count
ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # ..., entries on disk, entries, directory size, directory offset
LOCAL_CRC_AT = 14  # where the CRC-32 lies in a local header
CENTRAL_CRC_AT = 16  # ... and in a central directory record
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800
_ZIP64_EXTRA = 0x0001
_MAX32 = 0xFFFFFFFF
_MAX_EXTRACT_VERSION = 63  # the newest zip feature level a reader is asked to support, as in zipfile
# The end record plus the longest comment, and the 4 KiB block by which miniz may search further back.
_MAX_TAIL = END.size + 0xFFFF + 4096
# The end record is searched for in a short tail first (a torch.save file has no comment), over the
# longest one only when it is not there: over a network the 64 KiB tail is most of a small file. The short
# tail is 1/4096 of the archive, at least 1 KiB: on a larger file it brings the directory in the same
# request, at a cost of at most 0.025% of the file.
_FIRST_TAIL = 1024


class ZipFormatError(ValueError):
    """A zip record is missing, truncated or inconsistent; the text says which and where."""


class CentralRecord(NamedTuple):
    """One central directory record (a tuple: archives hold thousands). Offsets are absolute in the file."""

    name: str
    record_offset: int  # where the record starts
    name_length: int  # the name's bytes follow the 46 fixed bytes of the record
    flags: int
    method: int
    crc: int
    stored_size: int  # bytes in the file (compressed size)
    size: int  # bytes once decompressed
    header_offset: int  # where the entry's local header starts


@dataclass(frozen=True)
class ZipDirectory:
    """An archive's central directory, read once.

    Attributes:
        base: absolute offset of the archive's first byte (non-zero for archives embedded in a file).
        end: where the archive ends (the file size for a plain zip file).
        start: absolute offset of the central directory.
        raw: the bytes from ``start`` to ``end`` (the directory and the end records), as read.
        records: the records, in directory order.
        announced: the entry count the end record states (torch's reader reads that many records).
    """

    base: int
    end: int
    start: int
    raw: bytes
    records: tuple[CentralRecord, ...]
    announced: int = -1

    @property
    def crc32_absent(self) -> bool:
        """The writer stored no CRC-32 (``torch.save`` with ``compute_crc32 = False``): every entry's is 0,
        with the data descriptor torch's writer uses, though some entry holds data (whose CRC is not 0).
        One zeroed CRC among real ones is not this, and is still checked."""
        return any(rec.size > 0 for rec in self.records) and all(
            rec.crc == 0 and rec.flags & FLAG_DESCRIPTOR for rec in self.records
        )


def pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    """``size`` bytes at ``offset``; ZipFormatError naming ``what`` when the file ends first."""
    data = pread(fd, size, offset)
    if len(data) != size:
        raise ZipFormatError(f"{what} at byte {offset} is truncated")
    return data


def _read(fd: int, tail: bytes, tail_start: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``: from the tail already read when it holds them (the ZIP64 records sit
    just before the end record), else one pread."""
    if tail_start <= offset and offset + size <= tail_start + len(tail):
        return tail[offset - tail_start : offset - tail_start + size]
    return pread(fd, size, offset)


def end_record_at(fd: int, base: int, end: int) -> int:
    """Where the end record lies, found as torch's reader (miniz) finds it: the last signature with a whole
    record after it, searched back from the end over the longest comment (and miniz's last 4 KiB block).

    Raises:
        ZipFormatError: no end record.
    """
    first = min(max((end - base) >> 12, _FIRST_TAIL), _MAX_TAIL)
    for longest in (first, _MAX_TAIL):  # the last signature in a short tail is the last one overall
        tail_len = min(end - base, longest)
        tail = pread(fd, tail_len, end - tail_len)
        at = tail.rfind(END_SIGNATURE, 0, max(len(tail) - END.size + len(END_SIGNATURE), 0))
        if at >= 0:
            return end - tail_len + at
        if tail_len == end - base:
            break
    raise ZipFormatError("no end-of-central-directory record")


def directory_bounds(fd: int, base: int, end: int) -> tuple[int, int, int]:
    """(absolute offset, size, entry count) of the central directory, from the (ZIP64) end records.

    The ZIP64 end record is the one just before its locator when one is there (as miniz and zipfile read
    it), else where the locator points.

    Raises:
        ZipFormatError: no end record, a missing ZIP64 end record, or a directory past the end.
    """
    eocd_at = end_record_at(fd, base, end)
    tail_start = max(eocd_at - ZIP64_LOCATOR.size - ZIP64_END.size, base)
    tail = pread(fd, eocd_at + END.size - tail_start, tail_start)
    _, _, _, _, count, size, offset, _ = END.unpack_from(tail, eocd_at - tail_start)
    locator_at = eocd_at - ZIP64_LOCATOR.size
    if locator_at >= base:
        locator = _read(fd, tail, tail_start, ZIP64_LOCATOR.size, locator_at)
        if locator[:4] == ZIP64_LOCATOR_SIGNATURE:
            record_at = locator_at - ZIP64_END.size
            record = _read(fd, tail, tail_start, ZIP64_END.size, record_at) if record_at >= base else b""
            if record[:4] != ZIP64_END_SIGNATURE:
                record_at = base + ZIP64_LOCATOR.unpack(locator)[2]
                record = _read(fd, tail, tail_start, ZIP64_END.size, record_at) if record_at < end else b""
            if len(record) != ZIP64_END.size or record[:4] != ZIP64_END_SIGNATURE:
                raise ZipFormatError(f"the ZIP64 end record at byte {record_at} is missing")
            fields = ZIP64_END.unpack(record)
            count, size, offset = fields[7], fields[8], fields[9]
    if base + offset + size > end:
        raise ZipFormatError(f"the central directory ({size} bytes at {offset}) runs past the end")
    return base + offset, size, count


def _zip64_values(extra: bytes, values: tuple[int, int, int]) -> tuple[int, int, int]:
    """(size, stored size, header offset) with each 0xFFFFFFFF field replaced by its ZIP64 extra value."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if tag == _ZIP64_EXTRA:
            count = sum(v == _MAX32 for v in values)
            if length < 8 * count or at + 4 + 8 * count > len(extra):
                break
            wide = iter(struct.unpack_from(f"<{count}Q", extra, at + 4))
            size, stored, offset = (next(wide) if v == _MAX32 else v for v in values)
            return int(size), int(stored), int(offset)
        at += 4 + length
    raise ZipFormatError("a ZIP64 extra field is missing")


def parse_records(raw: bytes, start: int, size: int, base: int) -> tuple[CentralRecord, ...]:
    """The records of a central directory of ``size`` bytes at the head of ``raw`` (read at ``start``).

    Raises:
        ZipFormatError: a record is unreadable or runs past the directory.
    """
    records: list[CentralRecord] = []
    pos = 0
    while pos + CENTRAL.size <= size and raw[pos : pos + 4] == CENTRAL_SIGNATURE:
        f = CENTRAL.unpack_from(raw, pos)
        flags, method, crc, stored, usize = f[3], f[4], f[7], f[8], f[9]
        if f[2] & 0xFF > _MAX_EXTRACT_VERSION:  # the low byte of "version needed to extract"
            raise ZipFormatError(f"zip file version {(f[2] & 0xFF) / 10:.1f} at byte {start + pos}")
        name_len, extra_len, comment_len, header_offset = f[10], f[11], f[12], f[16]
        name_at = pos + CENTRAL.size
        if name_at + name_len + extra_len + comment_len > size:
            break
        try:
            name = raw[name_at : name_at + name_len].decode("utf-8" if flags & FLAG_UTF8 else "cp437")
        except UnicodeDecodeError:
            raise ZipFormatError(f"the entry name at byte {start + name_at} is not valid UTF-8") from None
        if _MAX32 in (usize, stored, header_offset):
            extra = raw[name_at + name_len : name_at + name_len + extra_len]
            usize, stored, header_offset = _zip64_values(extra, (usize, stored, header_offset))
        records.append(
            CentralRecord(
                name, start + pos, name_len, flags, method, crc, stored, usize, base + header_offset
            )
        )
        pos = name_at + name_len + extra_len + comment_len
    if pos != size:
        raise ZipFormatError(f"the central directory has an unreadable record at byte {start + pos}")
    return tuple(records)


def read_directory(fd: int, base: int = 0, end: int | None = None, *, strict: bool = False) -> ZipDirectory:
    """Read the end records and the central directory of the archive in ``[base, end)`` of ``fd``.

    Args:
        fd: the file, open for reading.
        base: where the archive starts in the file.
        end: where it ends (default: the end of the file).
        strict: also require the entry count the end record announces (the patcher rewrites records it
            must all have found; readers, like zipfile, go by the directory's size).

    Returns:
        The ZipDirectory.

    Raises:
        ZipFormatError: a record is missing or inconsistent (or, when strict, the entry count differs).
    """
    end = fd_size(fd) if end is None else end
    start, size, count = directory_bounds(fd, base, end)
    raw = pread_exact(fd, end - start, start, "the central directory")
    records = parse_records(raw, start, size, base)
    if strict and len(records) != count:
        raise ZipFormatError(
            f"the end record announces {count} entries but the central directory holds {len(records)}"
        )
    return ZipDirectory(base, end, start, raw, records, count)
