"""Zip entries located from their local headers, and members read whole with their CRC-32 checked."""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from bnaudit.checkpoint.bytesource import pread, prefetch
from bnaudit.checkpoint.zipdir import (
    CENTRAL_CRC_AT,
    DEFLATED,
    DESCRIPTOR_SIGNATURE,
    FLAG_DESCRIPTOR,
    FLAG_ENCRYPTED,
    FLAG_UTF8,
    LOCAL,
    LOCAL_CRC_AT,
    LOCAL_SIGNATURE,
    STORED,
    CentralRecord,
    ZipDirectory,
    ZipFormatError,
    pread_exact,
)

_CRC = struct.Struct("<L")
# Local headers closer than this are read in one pread, of at most _MAX_HEADER_RUN bytes: the small tensors
# of a layer share a run, while a larger tensor's data (past one page) is never read just to reach the next
# header, so no more bytes are touched than one header read per entry would.
_MAX_HEADER_GAP = 4 << 10
_MAX_HEADER_RUN = 1 << 20


class ZipEntry(NamedTuple):
    """Where one member's data and every copy of its CRC-32 lie (absolute offsets in the file).

    ``descriptor_crc_at`` is None when the entry has no data descriptor, or when its descriptor was not
    looked for (``locate_entries(..., descriptors=False)``, the readers' cheap path).
    """

    name: str
    header_offset: int
    data_offset: int
    stored_size: int
    size: int
    method: int
    flags: int
    crc: int
    central_crc_at: int
    local_crc_at: int | None  # None when the local header leaves the CRC to the data descriptor
    descriptor_crc_at: int | None
    crc_stored: bool = True  # False in an archive written without CRC-32s: its bytes cannot be verified

    @property
    def compressed(self) -> bool:
        return self.method != STORED

    @property
    def crc_fields(self) -> tuple[int, ...]:
        """Every located CRC-32 field, in file order."""
        fields = (self.central_crc_at, self.local_crc_at, self.descriptor_crc_at)
        return tuple(sorted(f for f in fields if f is not None))


def _reach(rec: CentralRecord) -> int:
    """Where a header run that holds ``rec`` reaches: its fixed header, and for a torch pickle (read whole
    next, whatever the caller) also its name and data, so that over a network the pickle comes in the
    request that brings the small entries after it."""
    if rec.name.endswith("data.pkl") and rec.stored_size <= _MAX_HEADER_RUN:
        return rec.header_offset + LOCAL.size + rec.name_length + rec.stored_size
    return rec.header_offset + LOCAL.size


def _header_runs(ordered: list[CentralRecord]) -> list[list[CentralRecord]]:
    """Group records sorted by header offset into runs one pread covers (small gaps, bounded size)."""
    runs: list[list[CentralRecord]] = []
    for rec in ordered:
        run = runs[-1] if runs else None
        last_reach = max(run[-1].header_offset, _reach(run[-1]) - LOCAL.size) if run else 0
        if (
            run is not None
            and rec.header_offset - last_reach <= _MAX_HEADER_GAP
            and rec.header_offset + LOCAL.size - run[0].header_offset <= _MAX_HEADER_RUN
        ):
            run.append(rec)
        else:
            runs.append([rec])
    return runs


def _entry(rec: CentralRecord, header: bytes, strict: bool, crc_stored: bool) -> ZipEntry:
    if len(header) != LOCAL.size or header[:4] != LOCAL_SIGNATURE:
        raise ZipFormatError(f"zip entry '{rec.name}' has no local header at offset {rec.header_offset}")
    f = LOCAL.unpack(header)
    local_flags, local_crc, name_len, extra_len = f[2], f[6], f[9], f[10]
    uses_descriptor = bool((local_flags | rec.flags) & FLAG_DESCRIPTOR)
    local_crc_at = None
    if not uses_descriptor or local_crc != 0:
        if strict and local_crc != rec.crc:
            raise ZipFormatError(
                f"zip entry '{rec.name}' has different CRCs in its local header and central directory"
            )
        local_crc_at = rec.header_offset + LOCAL_CRC_AT
    data_offset = rec.header_offset + LOCAL.size + name_len + extra_len
    central_crc_at = rec.record_offset + CENTRAL_CRC_AT
    return ZipEntry(
        rec.name, rec.header_offset, data_offset, rec.stored_size, rec.size, rec.method,
        rec.flags | local_flags, rec.crc, central_crc_at, local_crc_at, None, crc_stored,
    )  # fmt: skip


def _check_layout(ordered: list[ZipEntry], end: int) -> None:
    for entry, following in zip(ordered, [*ordered[1:], None], strict=True):
        data_end = entry.data_offset + entry.stored_size
        if data_end > end:
            raise ZipFormatError(
                f"zip entry '{entry.name}' ends at byte {data_end} but the archive ends at byte {end}"
            )
        if following is not None and following.header_offset < data_end:
            raise ZipFormatError(f"zip entries '{entry.name}' and '{following.name}' overlap")


def descriptor_crc_at(fd: int, entry: ZipEntry) -> int:
    """Where the CRC-32 lies in the data descriptor following an entry's data.

    The descriptor comes in four forms: with or without the ``PK\\x07\\x08`` signature, and with 4-byte or
    (ZIP64) 8-byte sizes. The form is the one whose CRC and sizes agree with the central directory.

    Raises:
        ZipFormatError: no form matches.
    """
    data_end = entry.data_offset + entry.stored_size
    raw = pread(fd, 24, data_end)
    for crc_at in (4, 0):  # with the signature first: a descriptor CRC equal to the signature is ambiguous
        if crc_at == 4 and raw[:4] != DESCRIPTOR_SIGNATURE:
            continue
        if len(raw) < crc_at + 4 or _CRC.unpack_from(raw, crc_at)[0] != entry.crc:
            continue
        for sizes in (struct.Struct("<LL"), struct.Struct("<QQ")):
            fits = len(raw) >= crc_at + 4 + sizes.size
            if fits and sizes.unpack_from(raw, crc_at + 4) == (entry.stored_size, entry.size):
                return data_end + crc_at
    raise ZipFormatError(f"the data descriptor of zip entry '{entry.name}' does not match its central record")


def locate_entries(fd: int, directory: ZipDirectory, *, descriptors: bool = False) -> dict[str, ZipEntry]:
    """Read every local header (batched); check that no entry's data overlaps another or runs past the end.

    Args:
        fd: the file.
        directory: its directory, from :func:`read_directory`.
        descriptors: also locate each data descriptor's CRC-32 (one more pread per entry that has one) and
            require the local header's CRC-32 to equal the central one: what the patcher, which rewrites
            every copy, needs; the readers' cheap path leaves both out.

    Returns:
        Entry name -> ZipEntry, in directory order; of duplicate names the last one counts, as in zipfile.

    Raises:
        ZipFormatError: a local header is missing or disagrees, entries overlap or run past the end.
    """
    by_record: dict[int, ZipEntry] = {}
    crc_stored = not directory.crc32_absent
    runs = [
        (run, run[0].header_offset, max(_reach(rec) for rec in run) - run[0].header_offset)
        for run in _header_runs(sorted(directory.records, key=lambda r: r.header_offset))
    ]
    prefetch(fd, [(start, size) for _, start, size in runs])  # over a network: one round trip for them all
    for run, run_start, size in runs:
        data = pread(fd, size, run_start)
        for rec in run:
            at = rec.header_offset - run_start
            by_record[rec.record_offset] = _entry(rec, data[at : at + LOCAL.size], descriptors, crc_stored)
    _check_layout(sorted(by_record.values(), key=lambda e: e.header_offset), directory.end)
    entries = {}
    for rec in directory.records:
        entry = by_record[rec.record_offset]
        if descriptors and entry.flags & FLAG_DESCRIPTOR:
            entry = entry._replace(descriptor_crc_at=descriptor_crc_at(fd, entry))
        entries[rec.name] = entry
    return entries


def entry_at(fd: int, rec: CentralRecord, crc_stored: bool) -> ZipEntry:
    """One record's entry, from its local header (for a record that a name does not single out).

    Raises:
        ZipFormatError: the local header is missing.
    """
    return _entry(rec, pread(fd, LOCAL.size, rec.header_offset), False, crc_stored)


def local_name(fd: int, entry: ZipEntry) -> str:
    """The name an entry's local header gives (zipfile refuses the entry when it is not the central one;
    torch's reader never looks)."""
    head = pread(fd, LOCAL.size, entry.header_offset)
    name_len = struct.unpack_from("<H", head, 26)[0] if len(head) == LOCAL.size else 0
    raw = pread(fd, name_len, entry.header_offset + LOCAL.size)
    return raw.decode("utf-8" if entry.flags & FLAG_UTF8 else "cp437", errors="replace")


def _stored_bytes(fd: int, entry: ZipEntry, check_name: bool = True, lenient: bool = False) -> bytes:
    """The entry's stored bytes, read with its local header in one pread; the local name must match
    (unless ``check_name`` is False: torch's reader never compares it). ``lenient``: an encryption flag is
    ignored, as torch's reader ignores a local header's flags."""
    if entry.flags & FLAG_ENCRYPTED and not lenient:
        raise ZipFormatError(f"zip entry '{entry.name}' is encrypted")
    span = entry.data_offset + entry.stored_size - entry.header_offset
    raw = pread_exact(fd, span, entry.header_offset, f"zip entry '{entry.name}'")
    name_len = struct.unpack_from("<H", raw, 26)[0]
    local_name = raw[LOCAL.size : LOCAL.size + name_len].decode(
        "utf-8" if entry.flags & FLAG_UTF8 else "cp437", errors="replace"
    )
    if check_name and local_name != entry.name:
        raise ZipFormatError(f"zip entry '{entry.name}' is named '{local_name}' in its local header")
    return raw[entry.data_offset - entry.header_offset :]


def _inflate(entry: ZipEntry, stored: bytes, limit: int) -> bytes:
    if entry.method == STORED:
        return stored[:limit]
    if entry.method != DEFLATED:
        raise ZipFormatError(f"zip entry '{entry.name}' uses compression method {entry.method}")
    try:
        # At most ``limit`` bytes come out, whatever the stream holds: a crafted entry cannot inflate to more.
        return zlib.decompressobj(-15).decompress(stored, limit)
    except zlib.error as exc:
        raise ZipFormatError(f"zip entry '{entry.name}' does not inflate ({exc})") from None


def read_member(fd: int, entry: ZipEntry, *, check_name: bool = True) -> bytes:
    """A member's bytes, inflated when deflated, with its local name, size and CRC-32 checked (where the
    archive stores CRC-32s: see :attr:`ZipDirectory.crc32_absent`).

    Raises:
        ZipFormatError: an encrypted entry, an unknown compression method, a short or corrupt stream, a
            local header naming another entry (when ``check_name``), or a CRC-32 that does not match.
    """
    data = _inflate(entry, _stored_bytes(fd, entry, check_name), entry.size + 1)
    if len(data) != entry.size:
        raise ZipFormatError(f"zip entry '{entry.name}' holds {len(data)} bytes, expected {entry.size}")
    if entry.crc_stored and zlib.crc32(data) != entry.crc:
        raise ZipFormatError(f"Bad CRC-32 for zip entry '{entry.name}'")
    return data


def read_member_as_torch(fd: int, entry: ZipEntry) -> bytes:
    """A member's bytes as torch's reader takes them: no local name, encryption flag or CRC-32 checked.

    Only for scanning what torch.load would unpickle from an entry :func:`read_member` refuses.
    """
    return _inflate(entry, _stored_bytes(fd, entry, check_name=False, lenient=True), entry.size)


def inflate_prefix(fd: int, entry: ZipEntry, end: int) -> bytes:
    """The first ``end`` bytes of a member; a whole member is checked as :func:`read_member` does.

    Raises:
        ZipFormatError: as :func:`read_member`.
    """
    if end >= entry.size:
        return read_member(fd, entry)
    return _inflate(entry, _stored_bytes(fd, entry), end)
