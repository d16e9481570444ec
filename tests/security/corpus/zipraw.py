"""Zip archives written byte by byte, so a case can say exactly where each record sits and what it claims."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes
    flags: int = 0
    crc: int | None = None  # None: the real CRC-32

    @property
    def real_crc(self) -> int:
        return zlib.crc32(self.data) if self.crc is None else self.crc


def local_record(member: Member, flags: int | None = None) -> bytes:
    """Local header + stored data."""
    raw = member.name.encode()
    size = len(member.data)
    fl = member.flags if flags is None else flags
    header = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, fl, 0, 0, 0x21, member.real_crc, size, size, len(raw), 0
    )
    return header + raw + member.data


def central_record(member: Member, offset: int) -> bytes:
    raw = member.name.encode()
    size = len(member.data)
    fields = (
        0x02014B50,
        20,
        20,
        member.flags,
        0,
        0,
        0x21,
        member.real_crc,
        size,
        size,
        len(raw),
        0,
        0,
        0,
        0,
        0,
    )
    return struct.pack("<IHHHHHHIIIHHHHHII", *fields, offset) + raw


def end_record(count: int, size: int, offset: int, comment: bytes = b"") -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, offset, len(comment)) + comment


def archive(members: list[Member]) -> bytes:
    """A plain stored archive: local records, then the central directory, then the end record."""
    body, offsets = b"", []
    for member in members:
        offsets.append(len(body))
        body += local_record(member)
    directory = b"".join(central_record(m, o) for m, o in zip(members, offsets, strict=True))
    return body + directory + end_record(len(members), len(directory), len(body))
