"""Verification of a patched output before it is renamed into place: bytes, CRC-32s, tensors read back."""

from __future__ import annotations

import bisect
import hashlib
import os
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.checkpoint.patch_plan import ByteRange, TensorPatch
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import TensorRef
from bnaudit.checkpoint.zipentries import ZipEntry
from bnaudit.errors import InputError, InternalError

_CHUNK = 4 << 20


@dataclass(frozen=True)
class Expected:
    """What the output must look like: the shift of the data, and the output ranges allowed to differ."""

    shift: int
    header_end: int  # output bytes before this are the (rewritten) safetensors header; 0 otherwise
    allowed: list[tuple[int, int]]


def verify_bytes(tmp: Path, reference: Path, exp: Expected, ranges: list[ByteRange]) -> tuple[str, str]:
    """Stream the output against the reference; return the sha256 of the reference and of the output."""
    ref_digest, out_digest = hashlib.sha256(), hashlib.sha256()
    allowed = sorted(exp.allowed)
    out_size, ref_size = tmp.stat().st_size, reference.stat().st_size
    if out_size != ref_size + exp.shift:
        raise verification_failed(tmp, f"size {out_size}, expected {ref_size + exp.shift}")
    # hashlib releases the GIL on large buffers: the reference is hashed in a second thread, in parallel.
    with (
        open(tmp, "rb", buffering=0) as out,
        open(reference, "rb", buffering=0) as ref,
        ThreadPoolExecutor(max_workers=1) as hasher,
    ):
        ref_digest.update(_read_exactly(ref, exp.header_end - exp.shift))
        out_digest.update(_read_exactly(out, exp.header_end))
        pos, first_open = exp.header_end, 0  # allowed[first_open:] may still reach the chunks ahead
        while chunk := _read_exactly(out, min(_CHUNK, out_size - pos)):
            expected = _read_exactly(ref, len(chunk))
            hashed = hasher.submit(ref_digest.update, expected)
            out_digest.update(chunk)
            hashed.result()
            end = pos + len(chunk)
            while first_open < len(allowed) and allowed[first_open][1] <= pos:
                first_open += 1
            last = bisect.bisect_left(allowed, (end,), first_open)  # the ranges starting before ``end``
            _compare_chunk(tmp, chunk, expected, pos, allowed[first_open:last])
            pos = end
    fd = os.open(tmp, os.O_RDONLY)
    try:
        for r in ranges:
            if os.pread(fd, len(r.data), r.offset + exp.shift) != r.data:
                raise verification_failed(tmp, f"the bytes of '{r.label}' are not the values computed")
    finally:
        os.close(fd)
    return ref_digest.hexdigest(), out_digest.hexdigest()


def _read_exactly(f: Any, size: int) -> bytes:
    data = f.read(size) if size > 0 else b""
    while len(data) < size:  # an unbuffered read may return less than asked
        more = f.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _compare_chunk(
    tmp: Path, chunk: bytes, expected: bytes, pos: int, allowed: Iterable[tuple[int, int]]
) -> None:
    """Check that ``chunk`` (output bytes at ``pos``) equals the reference's outside the allowed ranges."""
    patched: bytearray | None = None
    for a, b in allowed:
        lo, hi = max(a, pos), min(b, pos + len(chunk))
        if lo < hi:
            patched = patched if patched is not None else bytearray(expected)
            patched[lo - pos : hi - pos] = chunk[lo - pos : hi - pos]
    if (patched if patched is not None else expected) != chunk:
        want = patched if patched is not None else expected
        first = next(i for i, (x, y) in enumerate(zip(want, chunk, strict=True)) if x != y)
        raise verification_failed(tmp, f"byte {pos + first} differs from the reference outside the patches")


def verification_failed(path: Path, what: str) -> InternalError:
    """The error for an output that is not what the writer meant to write (a bug in bnaudit)."""
    return InternalError(
        f"verification of the written checkpoint failed: {what}",
        path=path,
        fix="nothing was written — this is a bug in bnaudit, please report it",
    )


def verify_zip(tmp: Path, entries: Sequence[ZipEntry], shift: int) -> None:
    """Read each rewritten entry back with Python's zipfile, an independent reader that checks CRC-32s.

    Raises:
        InternalError: zipfile rejects the archive or an entry.
    """
    if not entries:
        return
    try:
        with zipfile.ZipFile(tmp) as zf:
            for entry in entries:
                # zipfile checks the CRC when an entry is read to its end.
                with zf.open(entry.name) as handle:
                    while handle.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError) as exc:
        raise verification_failed(tmp, f"zipfile rejects the archive ({exc})") from None


def verify_reload(tmp: Path, patches: Sequence[TensorPatch], ranges: list[ByteRange], shift: int) -> None:
    try:
        ckpt = load_checkpoint(tmp)
    except InputError as exc:
        raise verification_failed(tmp, f"the output cannot be read back ({exc})") from None
    by_label = {r.label: r for r in ranges}
    for patch in patches:
        try:
            ref = ckpt.state_dict(patch.state_dict).tensors[patch.key]
        except KeyError:
            raise verification_failed(tmp, f"tensor '{patch.label}' is missing when read back") from None
        if ref.byte_span()[0] != by_label[patch.label].offset + shift:
            raise verification_failed(tmp, f"tensor '{patch.label}' moved")
        expected = read_tensor(replace_storage(patch.ref, tmp, shift))
        if not np.array_equal(read_tensor(ref), expected, equal_nan=True):
            raise verification_failed(tmp, f"tensor '{patch.label}' does not read back as computed")


def replace_storage(ref: TensorRef, path: Path, shift: int) -> TensorRef:
    """The same tensor in another file whose bytes are displaced by ``shift``."""
    storage = replace(ref.storage, path=path, file_offset=ref.storage.file_offset + shift)
    return replace(ref, location=storage)
