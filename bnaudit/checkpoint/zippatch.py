"""Find every copy of a zip entry's CRC-32 (local header, data descriptor, central record); rewrite them."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from bnaudit.errors import InputError

_EOCD = struct.Struct("<4s4H2LH")  # signature, disk numbers, entry counts, cd size, cd offset, comment length
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the ZIP64 end record, disk count
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries on disk, entries, cd size, cd offset
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # the 46 fixed bytes of a central directory record
_CENTRAL_SIG = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s5H3L2H")  # the 30 fixed bytes of a local header
_LOCAL_SIG = b"PK\x03\x04"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_CRC = struct.Struct("<L")
_FLAG_DESCRIPTOR = 0x08  # general purpose bit 3: CRC and sizes follow the data
_ZIP64_EXTRA_ID = 0x0001
_MAX32 = 0xFFFFFFFF
_CHUNK = 1 << 20


@dataclass(frozen=True)
class EntryCrc:
    """Where one zip entry's data and every copy of its CRC-32 lie in the file.

    Attributes:
        name: the entry name.
        data_offset: absolute offset of the entry's stored data.
        stored_size: bytes of stored data.
        crc: the CRC-32 the central directory records.
        crc_fields: absolute offsets of the 4-byte CRC fields to rewrite when the data changes (central
            directory record, data descriptor, and the local header when it holds the CRC).
        compressed: True for any method other than stored.
    """

    name: str
    data_offset: int
    stored_size: int
    crc: int
    crc_fields: tuple[int, ...]
    compressed: bool


def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; the zip archive is corrupt or uses a layout bnaudit cannot patch")


def _pread(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset)


def _central_directory(path: Path, fd: int, file_size: int) -> tuple[int, int, int]:
    """(offset, size, entry count) of the central directory, from the (ZIP64) end records."""
    tail_len = min(file_size, _EOCD.size + 0xFFFF)
    tail = _pread(fd, tail_len, file_size - tail_len)
    at = tail.rfind(_EOCD_SIG)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _bad(path, "no end-of-central-directory record")
    eocd_offset = file_size - tail_len + at
    _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack(tail[at : at + _EOCD.size])
    if eocd_offset >= _ZIP64_LOCATOR.size:
        loc = _pread(fd, _ZIP64_LOCATOR.size, eocd_offset - _ZIP64_LOCATOR.size)
        if loc[:4] == _ZIP64_LOCATOR_SIG:
            _, _, z64_offset, _ = _ZIP64_LOCATOR.unpack(loc)
            rec = _pread(fd, _ZIP64_EOCD.size, z64_offset)
            if len(rec) != _ZIP64_EOCD.size or rec[:4] != _ZIP64_EOCD_SIG:
                raise _bad(path, f"the ZIP64 end record at byte {z64_offset} is missing")
            fields = _ZIP64_EOCD.unpack(rec)
            count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_offset + cd_size > file_size:
        raise _bad(path, f"the central directory ({cd_size} bytes at {cd_offset}) runs past the end")
    return cd_offset, cd_size, count


def _zip64_values(extra: bytes, wanted: list[str]) -> dict[str, int]:
    """Values of the ZIP64 extra field, in the order the format defines, for the fields marked 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, pos)
        if header_id == _ZIP64_EXTRA_ID:
            body = extra[pos + 4 : pos + 4 + size]
            values = {}
            for i, name in enumerate(wanted):
                if 8 * (i + 1) <= len(body):
                    values[name] = struct.unpack_from("<Q", body, 8 * i)[0]
            return values
        pos += 4 + size
    return {}


@dataclass(frozen=True)
class _Central:
    name: str
    record_offset: int
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int


def _central_records(path: Path, fd: int, cd_offset: int, cd_size: int) -> list[_Central]:
    data = _pread(fd, cd_size, cd_offset)
    records: list[_Central] = []
    pos = 0
    while pos + _CENTRAL.size <= len(data) and data[pos : pos + 4] == _CENTRAL_SIG:
        f = _CENTRAL.unpack_from(data, pos)
        flags, method, crc, csize, usize = f[3], f[4], f[7], f[8], f[9]
        name_len, extra_len, comment_len, header_offset = f[10], f[11], f[12], f[16]
        name_start = pos + _CENTRAL.size
        name = data[name_start : name_start + name_len].decode("utf-8", errors="replace")
        extra = data[name_start + name_len : name_start + name_len + extra_len]
        wanted = [n for n, v in (("size", usize), ("csize", csize), ("offset", header_offset)) if v == _MAX32]
        z64 = _zip64_values(extra, wanted)
        records.append(
            _Central(
                name,
                cd_offset + pos,
                flags,
                method,
                crc,
                z64.get("csize", csize),
                z64.get("size", usize),
                z64.get("offset", header_offset),
            )
        )
        pos = name_start + name_len + extra_len + comment_len
    if pos != len(data):
        raise _bad(path, f"the central directory has an unreadable record at byte {cd_offset + pos}")
    return records


def _descriptor_crc_offset(path: Path, fd: int, rec: _Central, data_end: int) -> int:
    """Offset of the CRC inside the data descriptor that follows an entry's data.

    The descriptor comes in four forms: with or without the ``PK\\x07\\x08`` signature, and with 4-byte or
    (ZIP64) 8-byte sizes. The form is the one whose CRC and sizes agree with the central directory.
    """
    raw = _pread(fd, 24, data_end)
    for crc_at in (4, 0):  # with the signature first: a descriptor CRC equal to the signature is ambiguous
        if crc_at == 4 and raw[:4] != _DESCRIPTOR_SIG:
            continue
        if len(raw) < crc_at + 4 or _CRC.unpack_from(raw, crc_at)[0] != rec.crc:
            continue
        for fmt in ("<LL", "<QQ"):
            width = struct.calcsize(fmt)
            if len(raw) >= crc_at + 4 + width:
                csize, usize = struct.unpack_from(fmt, raw, crc_at + 4)
                if (csize, usize) == (rec.compressed_size, rec.size):
                    return data_end + crc_at
    raise _bad(path, f"the data descriptor of entry '{rec.name}' does not match its central directory record")


def _entry(path: Path, fd: int, rec: _Central) -> EntryCrc:
    header = _pread(fd, _LOCAL.size, rec.header_offset)
    if len(header) != _LOCAL.size or header[:4] != _LOCAL_SIG:
        raise _bad(path, f"entry '{rec.name}' has no local header at byte {rec.header_offset}")
    f = _LOCAL.unpack(header)
    local_flags, local_crc, name_len, extra_len = f[2], f[6], f[9], f[10]
    data_offset = rec.header_offset + _LOCAL.size + name_len + extra_len
    fields = [rec.record_offset + 16]
    uses_descriptor = bool((local_flags | rec.flags) & _FLAG_DESCRIPTOR)
    if not uses_descriptor or local_crc != 0:
        if local_crc != rec.crc:
            raise _bad(
                path, f"entry '{rec.name}' has different CRCs in its local header and central directory"
            )
        fields.append(rec.header_offset + 14)
    if uses_descriptor:
        fields.append(_descriptor_crc_offset(path, fd, rec, data_offset + rec.compressed_size))
    return EntryCrc(
        rec.name, data_offset, rec.compressed_size, rec.crc, tuple(sorted(fields)), rec.method != 0
    )


def locate_entries(path: Path) -> dict[str, EntryCrc]:
    """Parse a zip archive's end records, central directory, local headers and data descriptors.

    Args:
        path: the zip file.

    Returns:
        Entry name -> EntryCrc.

    Raises:
        InputError: a record is missing or inconsistent (the archive is corrupt or unusual).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        cd_offset, cd_size, count = _central_directory(path, fd, file_size)
        records = _central_records(path, fd, cd_offset, cd_size)
        if len(records) != count:
            raise _bad(
                path,
                f"the end record announces {count} entries but the central directory holds {len(records)}",
            )
        return {rec.name: _entry(path, fd, rec) for rec in records}
    finally:
        os.close(fd)


def crc32_range(fd: int, offset: int, size: int) -> int:
    """CRC-32 of ``size`` bytes at ``offset`` of an open file, read in chunks."""
    crc = 0
    done = 0
    while done < size:
        chunk = _pread(fd, min(_CHUNK, size - done), offset + done)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def rewrite_crc(fd: int, entry: EntryCrc, shift: int = 0) -> int:
    """Recompute an entry's CRC-32 from the data now in the file and write it into every CRC field.

    Args:
        fd: the file, open for reading and writing.
        entry: the entry, located in the file the output was copied from.
        shift: how far the output's bytes are displaced from the located offsets (0 for an in-place copy).

    Returns:
        The new CRC-32.
    """
    crc = crc32_range(fd, entry.data_offset + shift, entry.stored_size)
    packed = _CRC.pack(crc)
    for field in entry.crc_fields:
        os.pwrite(fd, packed, field + shift)
    return crc
