"""Patch planning: each tensor's new bytes, and the proof that writing them in place changes nothing else."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.checkpoint.tensor_codec import DtypeOverflowError, encode_like
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat, Placeholder, StorageRef, TensorRef
from bnaudit.errors import InputError, InternalError, UnsupportedFormatError


@dataclass(frozen=True)
class TensorPatch:
    """New values for one tensor of the reference checkpoint.

    Attributes:
        state_dict: the state dict's name (``model``, ``""`` for the top level), for messages and checks.
        key: the tensor's original key in that state dict.
        ref: the tensor as read from the reference checkpoint.
        values: the new values in float64, shape ``ref.shape``; written in ``ref.dtype``.
    """

    state_dict: str
    key: str
    ref: TensorRef
    values: np.ndarray

    @property
    def label(self) -> str:
        return f"{self.state_dict}:{self.key}" if self.state_dict else self.key


@dataclass(frozen=True)
class ByteRange:
    """Bytes to write at an absolute offset of the reference file (before any header shift)."""

    offset: int
    data: bytes
    label: str
    storage: str  # the storage holding the bytes (a zip entry, whose CRC-32 the zip fix-up rewrites)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_patched` wrote.

    Attributes:
        path: the output.
        format: its container format (the reference's).
        reference_sha256: sha256 of the reference file, computed while copying it (None for a server-side
            copy, which reads only the bytes it needs).
        output_sha256: sha256 of the output, computed while verifying it (None for a server-side copy).
        ranges: the byte ranges rewritten (offsets in the reference).
        crc_entries: the zip entries whose CRC-32 was recomputed.
        metadata: the entries added to a safetensors header.
        upload: for a URL output, the upload path taken; None for a local file.
    """

    path: Path
    format: ContainerFormat
    reference_sha256: str | None
    output_sha256: str | None
    ranges: list[ByteRange]
    crc_entries: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    upload: str | None = None  # for a URL output: how it was uploaded (see checkpoint/remote_write.py)


def iter_refs(root: Any) -> Iterator[TensorRef | StorageRef]:
    """Every TensorRef, and every StorageRef not wrapped in a tensor, reachable from a rebuilt container.

    Walks mappings, sequences, sets and inert placeholders (arguments, state, items), each object once.
    """
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, TensorRef | StorageRef):
            yield obj
            continue
        if isinstance(obj, str | bytes | int | float | bool) or obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Mapping):
            stack.extend(obj.keys())
            stack.extend(obj.values())
            stack.extend(getattr(obj, "__dict__", {}).values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, Placeholder):
            stack.extend([obj.args, obj.state, obj.items, obj.dict_items, obj.kwargs])


def refuse(ckpt: Checkpoint, what: str) -> UnsupportedFormatError:
    """The error for a patch that would not be safe in place (``what`` says why)."""
    return UnsupportedFormatError(
        f"{what}; bnaudit patches statistics in place only when that is safe",
        path=ckpt.path,
        fix="re-save the checkpoint with torch.save(model.state_dict()) or write a new file with --to",
    )


def _span(ref: TensorRef) -> tuple[int, int]:
    return ref.byte_span()


def _encode(ckpt: Checkpoint, patch: TensorPatch) -> bytes:
    ref = patch.ref
    if tuple(np.shape(patch.values)) != ref.shape:
        raise InternalError(
            f"new values have shape {np.shape(patch.values)}, expected {ref.shape}", path=patch.label
        )
    try:
        return encode_like(np.asarray(patch.values, dtype=np.float64), ref.dtype)
    except DtypeOverflowError as exc:
        fields = exc.fields
        raise DtypeOverflowError(
            fields.problem,
            path=ckpt.path,
            where=f"tensor '{patch.label}'",
            found=fields.found,
            fix=f"{fields.fix}; nothing was written" if fields.fix else "nothing was written",
        ) from None
    except ValueError as exc:
        raise UnsupportedFormatError(f"tensor '{patch.label}': {exc}", path=ckpt.path) from None


def encode_patches(ckpt: Checkpoint, patches: Sequence[TensorPatch]) -> list[bytes]:
    """Each patch's values as raw bytes of its tensor's dtype (bf16 rounded to nearest even).

    Raises:
        DtypeOverflowError: a value does not fit the tensor's dtype; the message names the file and tensor.
    """
    return [_encode(ckpt, p) for p in patches]


def _check_target(ckpt: Checkpoint, patch: TensorPatch) -> None:
    ref = patch.ref
    if ref.storage.path != ckpt.path:
        raise refuse(ckpt, f"tensor '{patch.label}' lives in another file ({ref.storage.path})")
    if ref.storage.compressed:
        raise refuse(ckpt, f"tensor '{patch.label}' is stored in a compressed zip entry '{ref.storage.key}'")
    if ref.storage.inline is not None:
        raise refuse(ckpt, f"tensor '{patch.label}' is a NumPy array inside the pickle")
    if not ref.is_contiguous():
        raise refuse(ckpt, f"tensor '{patch.label}' is not contiguous (stride {list(ref.stride)})")
    end = _span(ref)[1]
    if end - ref.storage.file_offset > ref.storage.nbytes:
        raise InputError(
            (
                f"tensor '{patch.label}' needs {end - ref.storage.file_offset} bytes of storage "
                f"'{ref.storage.key}', which holds {ref.storage.nbytes}"
            ),
            path=ckpt.path,
            fix="the file is corrupt — re-save it",
        )


def _check_overlaps(ckpt: Checkpoint, ranges: list[ByteRange], targets: set[TensorRef]) -> None:
    """Refuse when patched bytes are shared with a tensor or storage that is not rewritten identically."""
    ordered = sorted(ranges, key=lambda r: r.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.end and (a.offset, a.data) != (b.offset, b.data):
            raise refuse(ckpt, f"tensors '{a.label}' and '{b.label}' share bytes but get different values")
    starts = [r.offset for r in ordered]
    for ref in iter_refs(ckpt.root):
        if isinstance(ref, TensorRef):
            if ref in targets or ref.numel == 0:
                continue
            start, end = _span(ref)
            what = f"a {ref.dtype} tensor of shape {list(ref.shape)}"
        else:
            start, end, what = ref.file_offset, ref.file_offset + ref.nbytes, f"storage '{ref.key}'"
        # Ranges do not overlap each other (identical ones aside), so their ends grow with their offsets:
        # the last range starting before ``end`` is the only one that can reach past ``start``.
        i = bisect.bisect_left(starts, end)
        if i and ordered[i - 1].end > start:
            label = ordered[i - 1].label
            raise refuse(ckpt, f"the storage of '{label}' is shared with {what} that would change with it")


def plan_patches(ckpt: Checkpoint, patches: Sequence[TensorPatch]) -> list[ByteRange]:
    """Encode every patch and check that overwriting its bytes in place changes nothing else.

    Args:
        ckpt: the reference checkpoint (torch zip, legacy torch or safetensors).
        patches: the tensors to rewrite.

    Returns:
        The byte ranges to write, in file order.

    Raises:
        UnsupportedFormatError: a target is compressed, non-contiguous, in another file, or shares bytes
            with a tensor that is not rewritten identically (the format is the writer's to check).
        DtypeOverflowError: a value does not fit the tensor's dtype.
    """
    ranges: list[ByteRange] = []
    for patch in patches:
        _check_target(ckpt, patch)
        ranges.append(
            ByteRange(_span(patch.ref)[0], _encode(ckpt, patch), patch.label, patch.ref.storage.key)
        )
    _check_overlaps(ckpt, ranges, {p.ref for p in patches})
    return sorted(ranges, key=lambda r: r.offset)
