"""A repaired copy of an S3 reference written to the same store without downloading it.

The output differs from the reference only in the patched tensors' bytes, the zip CRC-32 fields of their
entries (or a safetensors header with the metadata added), so it is written by one multipart upload whose
unchanged ranges are ``UploadPartCopy`` parts (server-side, no bytes through the client) and whose parts
holding new bytes are uploaded: the new bytes plus the unchanged bytes S3's 5 MiB minimum part size forces
in, fetched by range GET (:mod:`bnaudit.checkpoint.s3_part_plan` chooses the cut). Every copy and range
GET is conditional on the reference's ETag, so a reference replaced meanwhile fails the write.

The upload is completed to a temporary key beside the target, read back through bnaudit's own reader with
range reads (size, patched bytes and tensors, CRC-32s or header), and only then copied to the target key and
deleted; on any failure the upload is aborted or the temporary object deleted, so nothing appears at the
target. Without ``--force`` that copy is conditional (``If-None-Match: *``), so an object another writer put
at the target after the check is kept, not replaced. A file whose cut copies nothing (any file under
5 MiB) or needing more than 10,000 parts is left to the download + patch + upload path (None).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnaudit.checkpoint.bytesource import read_at, url_of
from bnaudit.checkpoint.formats import format_spec
from bnaudit.checkpoint.patch_fixups import (
    FixupPlan,
    NoFixups,
    SafetensorsHeaderFixups,
    ZipCrcFixups,
    entry_holding,
    header_problem,
    header_with_metadata,
)
from bnaudit.checkpoint.patch_plan import ByteRange, TensorPatch, WriteResult, plan_patches
from bnaudit.checkpoint.patch_verify import verification_failed, verify_reload
from bnaudit.checkpoint.s3_multipart import S3Object, copy_source, copy_whole, delete_quietly, multipart
from bnaudit.checkpoint.s3_part_plan import MAX_PARTS, Part, merge_ranges, plan_parts
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.zipentries import ZipEntry
from bnaudit.checkpoint.zippatch import locate_entries
from bnaudit.errors import OutputError
from bnaudit.temp_registry import signals_raise

log = logging.getLogger(__name__)
_LENGTH_BYTES = 8


@dataclass(frozen=True)
class Layout:
    """The output as the reference's bytes (displaced by ``fixed.shift``) under ``literals``."""

    size: int
    fixed: FixupPlan
    ranges: list[ByteRange]
    literals: list[tuple[int, bytes]]  # output offset, new bytes

    def dirty(self) -> list[tuple[int, int]]:
        return merge_ranges([(off, off + len(data)) for off, data in self.literals])


def same_store(source: str, target: str) -> bool:
    """Whether ``target`` can be written from ``source`` by server-side copy (both on one S3 store)."""
    if not (source.startswith("s3://") and target.startswith("s3://")):
        return False
    return S3Object(source).same_store(S3Object(target))


def _header_text(url: str) -> bytes:
    length = int.from_bytes(read_at(url, _LENGTH_BYTES, 0), "little")
    return read_at(url, length, _LENGTH_BYTES)


def _patched_crc(url: str, entry: ZipEntry, ranges: Sequence[ByteRange], shift: int = 0) -> int:
    """The CRC-32 of an entry's data with ``ranges`` written over it (read by range from ``url``)."""
    data = bytearray(read_at(url, entry.stored_size, entry.data_offset + shift))
    for r in ranges:
        if entry.data_offset <= r.offset < entry.data_offset + entry.stored_size:
            data[r.offset - entry.data_offset : r.end - entry.data_offset] = r.data
    return zlib.crc32(bytes(data))


def plan_layout(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], source: str, metadata: Mapping[str, str]
) -> Layout | None:
    """The output's bytes as literals over the reference; None for a format with no server-side path."""
    fixups = format_spec(ckpt.format).fixups
    ranges = plan_patches(ckpt, patches)
    literals = [(r.offset, r.data) for r in ranges]
    if isinstance(fixups, ZipCrcFixups):
        located = locate_entries(source)
        held = [entry_holding(ckpt, r, located.get(r.storage), r.storage) for r in ranges]
        entries = tuple({e.name: e for e in held if e.crc_stored}.values())
        for entry in entries:
            crc = _patched_crc(source, entry, ranges).to_bytes(4, "little")
            literals += [(f, crc) for f in entry.crc_fields]
        fixed = FixupPlan(crc_entries=entries)
    elif isinstance(fixups, SafetensorsHeaderFixups):
        old = _header_text(source)
        header = header_with_metadata(old, metadata)
        fixed = FixupPlan(header=header, data_start=_LENGTH_BYTES + len(old), metadata=dict(metadata))
        literals = [(0, header)] + [(off + fixed.shift, data) for off, data in literals]
    elif isinstance(fixups, NoFixups):
        fixed = FixupPlan()
    else:
        return None
    size = S3Object(source).size() + fixed.shift
    return Layout(size, fixed, ranges, sorted(literals, key=lambda lit: lit[0]))


def part_bytes(part: Part, layout: Layout, src: S3Object, etag: str) -> bytes:
    """An uploaded part: the reference's bytes fetched by range GET, the literals written over them."""
    buf = bytearray(part.size)
    lo = max(part.start, layout.fixed.header_end)
    if lo < part.end:
        shift = layout.fixed.shift
        buf[lo - part.start :] = src.get_range(lo - shift, part.end - shift, etag)
    for off, data in layout.literals:
        a, b = max(off, part.start), min(off + len(data), part.end)
        if a < b:
            buf[a - part.start : b - part.start] = data[a - off : b - off]
    return bytes(buf)


def verify_object(tmp: S3Object, layout: Layout, patches: Sequence[TensorPatch], source: str) -> None:
    """Read the written object back by range: size, patched bytes, CRC-32s or header, tensors.

    Raises:
        InternalError: the object is not what was meant (nothing is left at the target).
    """
    where, shift = Path(tmp.url), layout.fixed.shift
    if (size := tmp.size()) != layout.size:
        raise verification_failed(where, f"size {size}, expected {layout.size}")
    for r in layout.ranges:
        if read_at(tmp.url, len(r.data), r.offset + shift) != r.data:
            raise verification_failed(where, f"the bytes of '{r.label}' are not the values computed")
    for entry in layout.fixed.crc_entries:
        crc = _patched_crc(tmp.url, entry, (), shift)
        stored = {int.from_bytes(read_at(tmp.url, 4, f + shift), "little") for f in entry.crc_fields}
        if stored != {crc}:
            raise verification_failed(where, f"the CRC-32 of zip entry '{entry.name}' is stale")
    if layout.fixed.header is not None:
        problem = header_problem(_header_text(source), _header_text(tmp.url), layout.fixed.metadata)
        if problem is not None:
            raise verification_failed(where, problem)
    verify_reload(where, patches, layout.ranges, shift)


def _summary(parts: Sequence[Part], header_end: int) -> str:
    copied, uploaded = [p for p in parts if p.copy], [p for p in parts if not p.copy]
    fetched = sum(max(0, p.end - max(p.start, header_end)) for p in uploaded)
    return (
        f"server-side copy: {sum(p.size for p in copied)} bytes copied in {len(copied)} parts, "
        f"{sum(p.size for p in uploaded)} bytes uploaded in {len(uploaded)} parts ({fetched} of them fetched "
        "from the reference by range GET), verified on a temporary object, then copied to the key"
    )


def _copy_verify_place(
    layout: Layout,
    parts: Sequence[Part],
    patches: Sequence[TensorPatch],
    objects: tuple[S3Object, S3Object, str],
    replace: bool,
) -> None:
    """The upload to a temporary key, its verification, the copy to the target; nothing left on failure."""
    src, dst, etag = objects
    tmp = dst.sibling("part")
    multipart(
        tmp,
        parts,
        lambda p: copy_source(src, p.start - layout.fixed.shift, p.end - layout.fixed.shift, etag),
        lambda p: part_bytes(p, layout, src, etag),
    )
    try:
        verify_object(tmp, layout, patches, src.url)
        exists = OutputError("already exists", path=dst.url, where="-o", fix="pass --force to replace it")
        if not replace and dst.exists():
            raise exists
        try:
            copy_whole(tmp, dst, layout.size, replace=replace)
        except FileExistsError:  # another writer got there after the check: the conditional copy refused
            raise exists from None
    finally:
        delete_quietly(tmp)


def write_server_side(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    target: str,
    *,
    metadata: Mapping[str, str] | None = None,
    replace: bool = False,
) -> WriteResult | None:
    """Write the repaired copy of the S3 reference ``ckpt`` at the S3 URL ``target`` (module docstring).

    Returns:
        The WriteResult (``upload`` says what was copied and uploaded; the sha256 digests are None: they
        would need every byte read), or None when this path does not apply (nothing was written).

    Raises:
        as :func:`bnaudit.checkpoint.writer.write_patched`; OutputError when an object appeared at the
        target meanwhile without ``replace``; InputError for a failed request (nothing left at the target).
    """
    source = url_of(ckpt.path)
    assert source is not None
    src, dst = S3Object(source), S3Object(target)
    etag = src.etag()  # before the CRC-32s are computed: every later read and copy must see this version
    layout = plan_layout(ckpt, patches, source, metadata or {})
    if layout is None:
        return None
    parts = plan_parts(layout.size, layout.dirty())
    if not any(p.copy for p in parts) or len(parts) > MAX_PARTS:
        log.info("%s: %d parts, nothing to gain from a server-side copy", target, len(parts))
        return None
    with signals_raise():  # a SIGTERM aborts the upload and deletes the temporary object first
        _copy_verify_place(layout, parts, patches, (src, dst, etag), replace)
    how = _summary(parts, layout.fixed.header_end)
    log.info("wrote %s (%d bytes): %s", target, layout.size, how)
    crc_names = tuple(e.name for e in layout.fixed.crc_entries)
    return WriteResult(
        Path(target), ckpt.format, None, None, layout.ranges, crc_names, dict(layout.fixed.metadata), how
    )
