"""Format conversion on write (``--to``): torch file -> safetensors (one state dict) and safetensors -> "
"torch."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.atomic_output import AtomicOutput
from bnaudit.checkpoint.formats import FormatFamily
from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.checkpoint.patch_plan import ByteRange, TensorPatch, WriteResult, encode_patches
from bnaudit.checkpoint.safetensors_io import SAFETENSORS_DTYPES
from bnaudit.checkpoint.tensor_codec import encode_like
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import NUMPY_DTYPES, Checkpoint, ContainerFormat, StateDictRef, TensorRef
from bnaudit.errors import InputError, InternalError, UnsupportedFormatError, UsageError

_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_CHUNK = 4 << 20

Companions = Callable[[WriteResult], list[tuple[Path, str]]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_bytes(ref: TensorRef) -> bytes:
    """A tensor's elements as contiguous little-endian bytes of its own dtype.

    Raises:
        UnsupportedFormatError: an fp8 tensor that is not stored contiguously (no encoder for its bytes).
    """
    if ref.storage.in_file and ref.is_contiguous():
        start, end = ref.byte_span()
        fd = os.open(ref.storage.path, os.O_RDONLY)
        try:
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        if len(data) == end - start:
            return data
    values = read_tensor(ref)
    if ref.dtype in NUMPY_DTYPES:
        return np.ascontiguousarray(values).tobytes()
    if ref.dtype == "bfloat16":
        return encode_like(values, "bfloat16")  # exact: every bfloat16 value is a float64
    raise UnsupportedFormatError(
        (
            f"tensor in '{ref.storage.key}' is a non-contiguous {ref.dtype} tensor, which "
            "bnaudit "
            "cannot convert"
        ),
        path=ref.storage.path,
        fix="convert it with torch",
    )


def _only_state_dict(ckpt: Checkpoint, patches: Sequence[TensorPatch]) -> StateDictRef:
    names = sorted({p.state_dict for p in patches})
    if len(names) != 1:
        listed = ", ".join(repr(n) for n in names)
        raise UsageError(
            f"--to safetensors keeps one state dict, but {len(names)} are merged ({listed})",
            path=ckpt.path,
            fix=("pass --key to choose one"),
        )
    return ckpt.state_dict(names[0])


def _dropped_from_torch(ckpt: Checkpoint, kept: StateDictRef) -> list[str]:
    notes = []
    root = ckpt.root
    if kept.path and isinstance(root, Mapping):
        others = [str(k) for k in root if k != kept.path[0]]
        if others:
            notes.append(
                f"--to safetensors keeps only the tensors of state dict '{kept.display_name}'; dropped "
                "top-level "
                f"entries: {', '.join(others)}"
            )
    other_sds = [sd.display_name for sd in ckpt.state_dicts if sd.name != kept.name]
    if other_sds:
        notes.append(f"--to safetensors dropped the other state dict(s): {', '.join(other_sds)}")
    container: Any = root
    for part in kept.path:
        container = container[part] if isinstance(container, Mapping) else None
    if isinstance(container, Mapping):
        non_tensor = [str(k) for k, v in container.items() if not isinstance(v, TensorRef)]
        if non_tensor:
            notes.append(
                f"--to safetensors dropped non-tensor entries of the state dict: {', '.join(non_tensor)}"
            )
    return notes


def _safetensors_header(
    sd: StateDictRef, metadata: Mapping[str, str]
) -> tuple[bytes, list[tuple[str, TensorRef]]]:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    order = []
    for key, ref in sd.tensors.items():
        st = _TO_SAFETENSORS.get(ref.dtype)
        if st is None:
            raise UnsupportedFormatError(
                f"tensor '{key}' has dtype {ref.dtype}, which safetensors cannot hold",
                where=sd.display_name,
                fix="keep the torch format (leave out --to)",
            )
        size = ref.numel * ref.itemsize
        entries[key] = {"dtype": st, "shape": list(ref.shape), "data_offsets": [offset, offset + size]}
        offset += size
        order.append((key, ref))
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _to_safetensors(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    out: Path,
    metadata: Mapping[str, str],
    writing: tuple[Companions | None, bool],
) -> WriteResult:
    companions, replace = writing
    sd = _only_state_dict(ckpt, patches)
    new_bytes = {p.key: data for p, data in zip(patches, encode_patches(ckpt, patches), strict=True)}
    header, order = _safetensors_header(sd, metadata)
    ref_sha = _sha256(ckpt.path)
    with AtomicOutput(out, replace=replace) as staged:
        with open(staged.tmp, "wb") as f:
            f.write(header)
            for key, ref in order:
                f.write(new_bytes[key] if key in new_bytes else tensor_bytes(ref))
        _verify_tensors(staged.tmp, "", {k: r for k, r in order}, new_bytes)
        ranges, written_meta = _ranges(patches, new_bytes), {"format": "pt", **metadata}
        result = WriteResult(
            out, ContainerFormat.SAFETENSORS, ref_sha, _sha256(staged.tmp), ranges, metadata=written_meta
        )
        for path, text in companions(result) if companions else []:
            staged.add_companion(path, text)
        staged.commit()
    return result


def _ranges(patches: Sequence[TensorPatch], new_bytes: Mapping[str, bytes]) -> list[ByteRange]:
    return [ByteRange(p.ref.byte_span()[0], new_bytes[p.key], p.label, p.ref.storage.key) for p in patches]


def _to_torch(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], out: Path, writing: tuple[Companions | None, bool]
) -> WriteResult:
    companions, replace = writing
    try:
        import torch  # conversion to a torch file is the one write path that needs torch
    except ImportError:
        raise UsageError(
            "needs torch, which is not installed",
            where="--to pt",
            fix="install it (pip install 'bnaudit[torch]') or leave out --to to keep the safetensors format",
        ) from None

    sd = ckpt.state_dicts[0]
    new_bytes = {p.key: data for p, data in zip(patches, encode_patches(ckpt, patches), strict=True)}
    tensors: dict[str, Any] = {}
    for key, ref in sd.tensors.items():
        raw = bytearray(new_bytes[key] if key in new_bytes else tensor_bytes(ref))
        dtype = getattr(torch, ref.dtype)
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[key] = flat.reshape(ref.shape).clone()
    ref_sha = _sha256(ckpt.path)
    with AtomicOutput(out, replace=replace) as staged:
        torch.save(tensors, staged.tmp)
        _verify_tensors(staged.tmp, "", dict(sd.tensors), new_bytes)
        result = WriteResult(
            out, ContainerFormat.TORCH_ZIP, ref_sha, _sha256(staged.tmp), _ranges(patches, new_bytes)
        )
        for path, text in companions(result) if companions else []:
            staged.add_companion(path, text)
        staged.commit()
    return result


def _verify_tensors(
    tmp: Path, sd_name: str, source: Mapping[str, TensorRef], new_bytes: Mapping[str, bytes]
) -> None:
    try:
        written = load_checkpoint(tmp).state_dict(sd_name).tensors
    except (InputError, KeyError) as exc:
        raise InternalError(
            f"the converted checkpoint cannot be read back ({exc})", path=tmp, fix="this is a bug in bnaudit"
        ) from None
    if list(written) != list(source):
        raise InternalError(
            "the converted checkpoint's keys differ from the source", path=tmp, fix="this is a bug in bnaudit"
        )
    for key, ref in source.items():
        expected = new_bytes[key] if key in new_bytes else tensor_bytes(ref)
        if tensor_bytes(written[key]) != expected or written[key].shape != ref.shape:
            raise InternalError(
                f"tensor '{key}' differs after conversion", path=tmp, fix="this is a bug in bnaudit"
            )


@dataclass(frozen=True)
class Conversion:
    """What ``--to`` asks for: the target family and what to write with it.

    Attributes:
        to: ``pt`` or ``safetensors`` (a :class:`FormatFamily` or its value).
        metadata: safetensors header metadata to write.
        companions: as for :func:`bnaudit.checkpoint.writer.write_patched`.
        dropped: receives one line per kind of content the conversion loses (before ``companions`` runs).
        replace: as for :func:`bnaudit.checkpoint.writer.write_patched`.
    """

    to: FormatFamily | str
    metadata: Mapping[str, str] | None = None
    companions: Companions | None = None
    dropped: list[str] | None = None
    replace: bool = False


def _convert_to_safetensors(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], out: Path, conversion: Conversion
) -> WriteResult:
    notes = _dropped_from_torch(ckpt, _only_state_dict(ckpt, patches))
    companions = _noting(conversion.companions, notes, conversion.dropped)
    return _to_safetensors(ckpt, patches, out, conversion.metadata or {}, (companions, conversion.replace))


def _convert_to_torch(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], out: Path, conversion: Conversion
) -> WriteResult:
    notes = []
    if ckpt.metadata:
        notes.append(f"--to pt dropped the safetensors metadata ({', '.join(sorted(ckpt.metadata))})")
    companions = _noting(conversion.companions, notes, conversion.dropped)
    return _to_torch(ckpt, patches, out, (companions, conversion.replace))


_CONVERTERS = {FormatFamily.SAFETENSORS: _convert_to_safetensors, FormatFamily.TORCH: _convert_to_torch}


def convert_checkpoint(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], out: Path, conversion: Conversion
) -> WriteResult:
    """Write ``out`` in another format: the reference's tensors with the patches applied.

    ``pt`` -> ``safetensors`` keeps only the tensors of the patched state dict (original keys) and needs no
    torch; ``safetensors`` -> ``pt`` writes the state dict with ``torch.save`` (safetensors metadata is lost).
    The output is read back and compared tensor by tensor before the atomic rename.

    Args:
        ckpt: the reference checkpoint.
        patches: the new values (all in one state dict for ``safetensors``).
        out: the output path.
        conversion: the target family, header metadata, companion files and the list of dropped content.

    Returns:
        The WriteResult (``ranges`` are the patched tensors' offsets in the reference).

    Raises:
        UsageError: several state dicts would have to go into one safetensors file.
        UnsupportedFormatError: a dtype the target format cannot hold.
        OutputError / InternalError: as for ``write_patched``.
    """
    return _CONVERTERS[FormatFamily(conversion.to)](ckpt, patches, out, conversion)


def _noting(companions: Companions | None, notes: list[str], dropped: list[str] | None) -> Companions | None:
    if dropped is not None:
        dropped.extend(notes)
    return companions
