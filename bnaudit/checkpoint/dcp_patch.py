"""Byte-patching one ``*.distcp`` file of a torch.distributed.checkpoint folder.

A ``.distcp`` file is a run of items: each tensor is either raw bytes or a small ``torch.save`` archive
(what DCP's file writer embeds), at the offset and length ``.metadata`` records. A patched tensor's bytes
are overwritten in place; when it lies in an embedded archive, that archive's CRC-32 fields of the entry are
rewritten (located inside the item's window, as the reader found them). The output is then checked byte by
byte against the input (only the patches and CRC fields differ), every CRC field is re-read, and each
rewritten archive is opened by Python's zipfile, which checks the CRC-32 independently.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bnaudit.checkpoint.dcp_metadata import parse_metadata, read_metadata_pickle
from bnaudit.checkpoint.patch_fixups import entry_holding
from bnaudit.checkpoint.patch_plan import ByteRange, TensorPatch, iter_refs, plan_patches
from bnaudit.checkpoint.patch_verify import Expected, verification_failed, verify_bytes
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat, TensorRef

# The writer's copy (inside the kernel) and positioned write, shared so the two writers copy alike.
from bnaudit.checkpoint.writer import _copy, _write_at
from bnaudit.checkpoint.zipdir import ZipFormatError, read_directory
from bnaudit.checkpoint.zipentries import ZipEntry, locate_entries
from bnaudit.checkpoint.zippatch import rewrite_crc, stale_crc_entry
from bnaudit.errors import InputError

Window = tuple[int, int]


@dataclass(frozen=True)
class FilePatch:
    """What was written into one data file: its ranges, the entries whose CRC changed, both digests."""

    name: str
    ranges: list[ByteRange]
    crc_entries: tuple[str, ...]
    reference_sha256: str
    output_sha256: str


def item_windows(folder: Path) -> dict[tuple[str, int], int]:
    """(data file, item offset) -> item length, for every item ``.metadata`` records."""
    root, _refs, _warnings = read_metadata_pickle(folder)
    meta = parse_metadata(folder, root)
    return {(w.relative_path, w.offset): w.length for w in meta.storage.values()}


def file_view(folder_ckpt: Checkpoint, data_file: Path) -> Checkpoint:
    """The folder's checkpoint seen as one data file: the tensors whose bytes lie in ``data_file``.

    The patch planner proves no patched range overlaps another tensor of the same file with it.
    """
    refs = [
        r for r in iter_refs(folder_ckpt.root) if isinstance(r, TensorRef) and r.storage.path == data_file
    ]
    return Checkpoint(data_file, ContainerFormat.DCP, refs)


def _window(ckpt: Checkpoint, r: ByteRange, windows: dict[tuple[str, int], int]) -> tuple[Window, str]:
    """The item window holding ``r`` and the archive entry name (empty for a raw item)."""
    label, _, entry = r.storage.partition("/")
    rel, _, offset = label.rpartition("@")
    length = windows.get((rel, int(offset))) if offset.isdigit() else None
    if length is None or not int(offset) <= r.offset <= r.end <= int(offset) + length:
        raise InputError(
            f"the bytes of '{r.label}' do not lie inside the item '{label}' that .metadata records",
            path=ckpt.path,
            fix="the checkpoint is corrupt — re-save it",
        )
    return (int(offset), int(offset) + length), entry


def _archive_entry(fd: int, ckpt: Checkpoint, r: ByteRange, window: Window, name: str) -> ZipEntry:
    try:
        entries = locate_entries(fd, read_directory(fd, window[0], window[1], strict=True), descriptors=True)
    except ZipFormatError as exc:
        raise InputError(str(exc), path=ckpt.path, where=f"item at byte {window[0]}") from None
    return entry_holding(ckpt, r, entries.get(name), name)


def _crc_plan(ckpt: Checkpoint, ranges: Sequence[ByteRange], folder: Path) -> list[tuple[ZipEntry, Window]]:
    """The embedded archives' entries whose CRC-32 must be rewritten, each with its item window."""
    windows = item_windows(folder)
    found: dict[tuple[int, str], tuple[ZipEntry, Window]] = {}
    fd = os.open(ckpt.path, os.O_RDONLY)
    try:
        for r in ranges:
            window, name = _window(ckpt, r, windows)
            if not name:
                continue  # raw bytes: DCP keeps no checksum of them
            entry = _archive_entry(fd, ckpt, r, window, name)
            if entry.crc_stored:
                found[(window[0], name)] = (entry, window)
    finally:
        os.close(fd)
    return list(found.values())


def _check_archives(tmp: Path, crcs: list[tuple[ZipEntry, Window]]) -> None:
    """Each rewritten archive opened by zipfile (an independent reader that checks the CRC-32)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        stale = stale_crc_entry(fd, [e for e, _ in crcs])
        if stale is not None:
            raise verification_failed(tmp, f"the CRC-32 of entry '{stale}' is stale")
        for entry, (start, end) in crcs:
            with zipfile.ZipFile(io.BytesIO(os.pread(fd, end - start, start))) as zf:
                zf.read(entry.name)
    except (zipfile.BadZipFile, OSError) as exc:
        raise verification_failed(tmp, f"zipfile rejects an embedded archive ({exc})") from None
    finally:
        os.close(fd)


def patch_data_file(
    folder_ckpt: Checkpoint, data_file: Path, patches: Sequence[TensorPatch], out: Path
) -> FilePatch:
    """Write ``out``: ``data_file`` with the patched tensors' bytes and their archives' CRC-32s rewritten.

    Args:
        folder_ckpt: the DCP folder as read (``load_checkpoint``).
        data_file: the ``.distcp`` file holding every patched tensor.
        patches: the tensors to rewrite.
        out: the new file (inside the temporary output folder).

    Raises:
        UnsupportedFormatError: a target cannot be patched in place. InternalError: verification failed.
    """
    view = file_view(folder_ckpt, data_file)
    ranges = plan_patches(view, patches)
    crcs = _crc_plan(view, ranges, folder_ckpt.path)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _copy(data_file, fd, None)
        for r in ranges:
            _write_at(fd, r.data, r.offset)
        for entry, _ in crcs:
            rewrite_crc(fd, entry)
    finally:
        os.close(fd)
    allowed = [(r.offset, r.end) for r in ranges] + [(f, f + 4) for e, _ in crcs for f in e.crc_fields]
    ref_sha, out_sha = verify_bytes(out, data_file, Expected(0, 0, allowed), ranges)
    _check_archives(out, crcs)
    return FilePatch(data_file.name, ranges, tuple(e.name for e, _ in crcs), ref_sha, out_sha)
