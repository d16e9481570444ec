"""What a container needs besides the patched bytes: zip CRC-32s rewritten, or a new safetensors header."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bnaudit.checkpoint.patch_plan import ByteRange, refuse
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.zipentries import ZipEntry
from bnaudit.checkpoint.zippatch import locate_entries, rewrite_crc, stale_crc_entry
from bnaudit.errors import InputError

_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class FixupPlan:
    """What one write needs besides the patched bytes, decided before the reference is copied.

    Attributes:
        header: a new header that replaces the reference's bytes before ``data_start`` (safetensors).
        data_start: where the reference's data starts (0 without a new header).
        crc_entries: the zip entries whose CRC-32 fields are rewritten after the patches.
        metadata: the entries added to a safetensors header.
    """

    header: bytes | None = None
    data_start: int = 0
    crc_entries: tuple[ZipEntry, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shift(self) -> int:
        """How far the output's data lies from the reference's (a longer header moves it)."""
        return 0 if self.header is None else len(self.header) - self.data_start

    @property
    def header_end(self) -> int:
        """Output bytes before this are the new header (0 when the header is kept)."""
        return 0 if self.header is None else len(self.header)

    def allowed(self) -> list[tuple[int, int]]:
        """Output byte ranges besides the patches that may differ from the reference: the CRC-32 fields."""
        return [(f + self.shift, f + self.shift + 4) for e in self.crc_entries for f in e.crc_fields]


class PatchFixups(Protocol):
    """A container's fix-ups, as the writer drives them: plan before the copy, apply after the patches."""

    def plan(self, ckpt: Checkpoint, ranges: Sequence[ByteRange], metadata: Mapping[str, str]) -> FixupPlan:
        """Decide the fix-ups for ``ranges`` (and the header ``metadata``, where the format has one)."""

    def apply(self, fd: int, plan: FixupPlan) -> None:
        """Apply them to the output, open for reading and writing, once the patches are written."""

    def problem(self, reference: Path, output: Path, plan: FixupPlan) -> str | None:
        """What is wrong with the fixed-up output (None when it is as planned)."""


class NoFixups:
    """Nothing beyond the patched bytes (legacy torch.save files hold no checksums)."""

    def plan(self, ckpt: Checkpoint, ranges: Sequence[ByteRange], metadata: Mapping[str, str]) -> FixupPlan:
        return FixupPlan()

    def apply(self, fd: int, plan: FixupPlan) -> None:
        return None

    def problem(self, reference: Path, output: Path, plan: FixupPlan) -> str | None:
        return None


def entry_holding(ckpt: Checkpoint, r: ByteRange, entry: ZipEntry | None, name: str) -> ZipEntry:
    """``entry``, checked to hold the bytes of ``r`` uncompressed (a top-level or an embedded archive's).

    Raises:
        InputError: the bytes lie outside the entry. UnsupportedFormatError: the entry is compressed.
    """
    if entry is None or not entry.data_offset <= r.offset <= r.end <= entry.data_offset + entry.stored_size:
        raise InputError(
            f"the bytes of '{r.label}' do not lie inside zip entry '{name}'",
            path=ckpt.path,
            fix="the file is corrupt — re-save it",
        )
    if entry.compressed:
        raise refuse(ckpt, f"zip entry '{entry.name}' holding '{r.label}' is compressed")
    return entry


class ZipCrcFixups:
    """The CRC-32 of each patched zip entry, in its central record, local header and data descriptor."""

    def plan(self, ckpt: Checkpoint, ranges: Sequence[ByteRange], metadata: Mapping[str, str]) -> FixupPlan:
        located = locate_entries(ckpt.path)
        out: dict[str, ZipEntry] = {}
        for r in ranges:
            entry = entry_holding(ckpt, r, located.get(r.storage), r.storage)
            if entry.crc_stored:  # an archive without CRC-32s keeps its zeros: there is nothing to update
                out[entry.name] = entry
        return FixupPlan(crc_entries=tuple(out.values()))

    def apply(self, fd: int, plan: FixupPlan) -> None:
        for entry in plan.crc_entries:
            rewrite_crc(fd, entry, plan.shift)

    def problem(self, reference: Path, output: Path, plan: FixupPlan) -> str | None:
        fd = os.open(output, os.O_RDONLY)
        try:
            stale = stale_crc_entry(fd, list(plan.crc_entries), plan.shift)
        finally:
            os.close(fd)
        return None if stale is None else f"the CRC-32 of zip entry '{stale}' is stale"


def _read_header_text(path: Path) -> bytes:
    with open(path, "rb") as f:
        (length,) = _LENGTH.unpack(f.read(_LENGTH.size))
        return f.read(length)


def safetensors_header_with(path: Path, entries: Mapping[str, str]) -> bytes:
    """The length-prefixed header of a safetensors file with ``entries`` added to its ``__metadata__``.

    Every other header entry and metadata key is kept, in order; the JSON is padded with spaces to a
    multiple of 8 bytes, as the safetensors library writes it. Data offsets are relative to the data
    section, so they stay valid when the header grows.
    """
    return header_with_metadata(_read_header_text(path), entries)


def header_with_metadata(text: bytes, entries: Mapping[str, str]) -> bytes:
    """:func:`safetensors_header_with` for the header's JSON ``text`` (read from a file or an object)."""
    header = json.loads(text)
    meta = dict(header.get("__metadata__") or {})
    meta.update(entries)
    new: dict[str, Any] = {"__metadata__": meta}
    new.update((k, v) for k, v in header.items() if k != "__metadata__")
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return _LENGTH.pack(len(text)) + text


def data_start(path: Path) -> int:
    """Where a safetensors file's data section starts (after the length and the JSON header)."""
    with open(path, "rb") as f:
        return _LENGTH.size + int(_LENGTH.unpack(f.read(_LENGTH.size))[0])


class SafetensorsHeaderFixups:
    """A new JSON header with the metadata entries added; the data section moves with the header's length."""

    def plan(self, ckpt: Checkpoint, ranges: Sequence[ByteRange], metadata: Mapping[str, str]) -> FixupPlan:
        header = safetensors_header_with(ckpt.path, metadata)
        return FixupPlan(header=header, data_start=data_start(ckpt.path), metadata=dict(metadata))

    def apply(self, fd: int, plan: FixupPlan) -> None:
        return None  # the header is written by the copy

    def problem(self, reference: Path, output: Path, plan: FixupPlan) -> str | None:
        return header_problem(_read_header_text(reference), _read_header_text(output), plan.metadata)


def header_problem(reference: bytes, output: bytes, metadata: Mapping[str, str]) -> str | None:
    """What is wrong with an output's safetensors header JSON (None: the reference's plus ``metadata``)."""
    old, new = json.loads(reference), json.loads(output)
    old_meta = dict(old.pop("__metadata__", None) or {})
    new_meta = dict(new.pop("__metadata__", None) or {})
    if old == new and new_meta == {**old_meta, **metadata} and list(old) == list(new):
        return None
    return "the safetensors header changed beyond the metadata"
