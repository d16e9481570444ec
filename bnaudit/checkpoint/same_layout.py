"""Recognising torch zip checkpoints laid out exactly like one already read (the ranks of one DDP job).

Every rank of a job saves the same model with ``torch.save``: the same pickle, the same zip entries in the
same order and at the same offsets. Only the tensor bytes differ — and with them the CRC-32 of each storage
entry — plus the archive's folder name, which ``torch.save`` takes from the file name (``ckpt_rank3/``). When
a file's layout is proven identical to a checkpoint already parsed, its tensors lie where that checkpoint's
tensor references say, so they can be read from it without parsing its zip directory or unpickling its
pickle again (about two thirds of the cost of reading a rank's BatchNorm statistics).

"Proven identical" is byte equality, never a guess:

- the file has the same size;
- its central directory and end records (everything from the directory's start to the end of the file)
  are equal to the template's, except the CRC-32 fields of the entries bnaudit does not read whole (the
  storages, whose bytes are read raw, and records such as ``.data/serialization_id`` that differ per save)
  and each entry name's folder part, which must be one folder name, the same in every entry, as
  ``torch.save`` writes;
- the 30-byte local header of every entry to be read is equal to the template's (the name and extra-field
  lengths fix where the data starts), again except those CRC-32 fields;
- the pickle and the ``byteorder`` record hold the same bytes (their CRC-32 fields are compared, not
  masked, so a corrupt CRC is still reported by the full reader).

Anything else — another size, a compressed entry, a ZIP64 field this module does not follow, a file it
cannot read — means "not the same layout", and the caller reads the file in full, with all its checks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bnaudit.checkpoint.types import Checkpoint, ContainerFormat, StorageRef, TensorRef
from bnaudit.checkpoint.zipdir import (
    CENTRAL,
    CENTRAL_CRC_AT,
    LOCAL,
    LOCAL_CRC_AT,
    LOCAL_SIGNATURE,
    STORED,
    ZipFormatError,
    directory_bounds,
    parse_records,
)

_LOCAL_SIZE = LOCAL.size
# Local headers closer than this are read in one pread, of at most _MAX_HEADER_RUN bytes.
_MAX_HEADER_GAP = 64 << 10
_MAX_HEADER_RUN = 1 << 20
_FIXED = ("data.pkl", "byteorder")  # records read whole: their bytes (and CRC-32) must be equal


@dataclass(frozen=True)
class _Entry:
    """One entry of the template's zip: where its local header, data size, name and CRC-32 field are."""

    header_offset: int
    stored: int  # bytes of data, from the central directory (torch's local headers leave sizes at 0)
    name_at: int  # offset of the entry's name within the directory bytes
    crc_at: int | None  # offset of its CRC-32 within the directory bytes when it may differ between ranks
    # (every entry but the pickle and the byte order record); None when it must be equal

    @property
    def masks_crc(self) -> bool:
        return self.crc_at is not None


@dataclass(frozen=True)
class LayoutTemplate:
    """A parsed torch zip checkpoint, and the bytes another file must share to be read through it.

    Immutable once built (ranks are checked against it from prefetch threads): it is made for the storages
    a caller will read, and only those can be read through it.
    """

    checkpoint: Checkpoint
    size: int
    directory_start: int
    directory: bytes  # from the central directory's start to the end of the file, masked CRC-32s zeroed
    folder: bytes  # the archive folder, with its trailing "/" (b"ckpt_rank0/")
    entries: dict[str, _Entry]  # by entry name without the folder
    fixed: dict[str, tuple[int, bytes]]  # pickle and byte order: where their data starts, and the data
    read_names: frozenset[str]  # the entries read through the template: the storages and the fixed records
    read_entries: tuple[_Entry, ...]  # those entries by offset
    local_headers: bytes  # their local headers in the template, CRC-32s masked

    @classmethod
    def of(cls, checkpoint: Checkpoint, storages: Iterable[TensorRef]) -> LayoutTemplate | None:
        """A template from a checkpoint read in full, for reading ``storages`` (tensor references of it)
        from files laid out alike; None when it is not a plain torch zip file or they are not its storages."""
        if checkpoint.format is not ContainerFormat.TORCH_ZIP or checkpoint.warnings:
            return None
        try:
            with open(checkpoint.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start, directory_size, _ = directory_bounds(f.fileno(), 0, size)
                directory = os.pread(f.fileno(), size - start, start)
        except (OSError, ZipFormatError):
            return None
        walked = _walk_directory(directory, start, directory_size)
        if walked is None:
            return None
        folder, entries = walked
        names = _storage_entries(storages, checkpoint.path, folder, entries)
        if names is None:
            return None
        try:
            fixed = {name: _fixed_data(checkpoint.path, entries[name]) for name in _FIXED if name in entries}
            read = tuple(sorted((entries[n] for n in names | set(fixed)), key=lambda e: e.header_offset))
            with open(checkpoint.path, "rb") as f:
                headers = _local_headers(f.fileno(), list(read))
        except (OSError, ValueError):
            return None
        masked = _masked(directory, entries)
        return cls(checkpoint, size, start, masked, folder, entries, fixed, frozenset(names), read, headers)

    def same_layout(self, path: Path, storages: Iterable[TensorRef]) -> bool:
        """True when ``path`` is laid out exactly as the template (see the module docstring), so that
        ``storages`` — tensor references of the template — can be read from ``path`` at the same offsets.

        Never raises for a file it cannot read or understand: that is simply not the same layout.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            return self._same_layout(fd, storages)
        except (OSError, ValueError, KeyError, struct.error):
            return False
        finally:
            os.close(fd)

    def _same_layout(self, fd: int, storages: Iterable[TensorRef]) -> bool:
        if os.fstat(fd).st_size != self.size:
            return False
        directory = os.pread(fd, self.size - self.directory_start, self.directory_start)
        folder = _folder_of(directory, self.entries["data.pkl"].name_at, len(self.folder))
        if folder is None:
            return False
        expected = bytearray(self.directory)
        for entry in self.entries.values():  # this file's folder name in every entry
            expected[entry.name_at : entry.name_at + len(folder)] = folder
        if expected != _masked(directory, self.entries):
            return False
        names = _storage_entries(storages, self.checkpoint.path, self.folder, self.entries)
        if names is None or not names <= self.read_names:
            return False  # storages the template was not made for: read the file in full
        return _local_headers(fd, list(self.read_entries)) == self.local_headers and self._same_fixed_data(fd)

    def _same_fixed_data(self, fd: int) -> bool:
        return all(os.pread(fd, len(data), start) == data for start, data in self.fixed.values())


def _storage_entries(
    storages: Iterable[TensorRef], path: Path, folder: bytes, entries: dict[str, _Entry]
) -> set[str] | None:
    """The entries holding ``storages`` (names without the folder), or None when one of them is not a
    plain, uncompressed storage of the file at ``path``."""
    names = set()
    prefix = folder.decode("utf-8", "replace")
    for ref in storages:
        storage = ref.location
        if not isinstance(storage, StorageRef) or not storage.in_file or storage.path != path:
            return None
        if not storage.key.startswith(prefix) or storage.key[len(prefix) :] not in entries:
            return None
        names.add(storage.key[len(prefix) :])
    return names


def _fixed_data(path: Path, entry: _Entry) -> tuple[int, bytes]:
    """Where a record read whole starts, and its bytes in the template."""
    with open(path, "rb") as f:
        header = _local_headers(f.fileno(), [entry])
        method = struct.unpack_from("<H", header, 8)[0]
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        if method != 0:
            raise ValueError("a record read whole is compressed")
        start = entry.header_offset + _LOCAL_SIZE + name_len + extra_len
        data = os.pread(f.fileno(), entry.stored, start)
    if len(data) != entry.stored:
        raise ValueError("a record read whole ends past the end of the file")
    return start, data


def _local_headers(fd: int, ordered: list[_Entry]) -> bytes:
    """The 30-byte local headers of ``ordered`` (sorted by offset), concatenated, each CRC-32 zeroed where
    ranks may differ. Headers close together are read in one pread (a layer's tensors sit side by side).

    Raises:
        ValueError: a header is missing (no signature where the directory says it starts).
    """
    out = bytearray()
    at = 0
    while at < len(ordered):
        run_start, end = ordered[at].header_offset, at + 1
        while (
            end < len(ordered)
            and ordered[end].header_offset - ordered[end - 1].header_offset <= _MAX_HEADER_GAP
            and ordered[end].header_offset + _LOCAL_SIZE - run_start <= _MAX_HEADER_RUN
        ):
            end += 1
        data = os.pread(fd, ordered[end - 1].header_offset + _LOCAL_SIZE - run_start, run_start)
        for entry in ordered[at:end]:
            header = bytearray(
                data[entry.header_offset - run_start : entry.header_offset - run_start + _LOCAL_SIZE]
            )
            if len(header) != _LOCAL_SIZE or header[:4] != LOCAL_SIGNATURE:
                raise ValueError("no local header where the directory says")
            if entry.masks_crc:
                header[LOCAL_CRC_AT : LOCAL_CRC_AT + 4] = b"\0\0\0\0"
            out += header
        at = end
    return bytes(out)


def _walk_directory(directory: bytes, start: int, size: int) -> tuple[bytes, dict[str, _Entry]] | None:
    """The archive folder and the entries (by name without the folder), or None when the directory is not
    the plain, single-folder directory ``torch.save`` writes."""
    try:
        records = parse_records(directory, start, size, 0)
    except ZipFormatError:
        return None
    entries: dict[str, _Entry] = {}
    folder: bytes | None = None
    for rec in records:
        name_at = rec.record_offset - start + CENTRAL.size
        raw_name = directory[name_at : name_at + rec.name_length]
        slash = raw_name.find(b"/")
        if rec.method != STORED or slash <= 0:
            return None  # compressed or folder-less entries
        folder = raw_name[: slash + 1] if folder is None else folder
        if raw_name[: slash + 1] != folder:
            return None
        name = rec.name[rec.name.index("/") + 1 :]
        crc_at = None if name in _FIXED else rec.record_offset - start + CENTRAL_CRC_AT
        entries[name] = _Entry(rec.header_offset, rec.stored_size, name_at, crc_at)
    if folder is None or "data.pkl" not in entries:
        return None
    return folder, entries


def _folder_of(directory: bytes, name_at: int, length: int) -> bytes | None:
    """The folder name another file uses (same length as the template's), if it is a plain folder name."""
    folder = directory[name_at : name_at + length]
    if len(folder) != length or not folder.endswith(b"/") or b"/" in folder[:-1]:
        return None
    return folder


def _masked(directory: bytes, entries: dict[str, _Entry]) -> bytes:
    """The directory bytes with the CRC-32 fields that may differ between ranks zeroed."""
    out = bytearray(directory)
    for entry in entries.values():
        if entry.crc_at is not None:
            out[entry.crc_at : entry.crc_at + 4] = b"\0\0\0\0"
    return bytes(out)
