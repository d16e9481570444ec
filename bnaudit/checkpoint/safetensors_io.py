"""Reader for safetensors files: parses the JSON header itself and reads no tensor data."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.bytesource import close, fd_size, open_read, pread
from bnaudit.checkpoint.bytesource import file_size as source_size
from bnaudit.checkpoint.types import ITEMSIZE, Checkpoint, ContainerFormat, StorageRef, TensorRef
from bnaudit.errors import InputError

SAFETENSORS_DTYPES: dict[str, str] = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
    "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # a header this large is corrupt, not a real model's index
_LENGTH = struct.Struct("<Q")


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the absolute offset of the data section."""
    fd = open_read(path)
    try:
        return _parse_header(path, fd)
    finally:
        close(fd)


def _parse_header(path: Path, fd: int) -> tuple[dict[str, Any], int]:
    file_size = fd_size(fd)
    # the header: its length, then the JSON (one read each; a range request each remotely)
    raw_len = pread(fd, _LENGTH.size, 0)
    if len(raw_len) != _LENGTH.size:
        raise InputError(
            f"is {file_size} bytes, too short for a safetensors header",
            path=path,
            fix="the file is truncated — re-save it",
        )
    (length,) = _LENGTH.unpack(raw_len)
    if length > MAX_HEADER_BYTES or _LENGTH.size + length > file_size:
        raise InputError(
            (
                f"safetensors header length is {length} bytes but the file has {file_size} bytes "
                f"(limit {MAX_HEADER_BYTES})"
            ),
            path=path,
            fix="the header length is corrupt or the file truncated — re-save it",
        )
    text = pread(fd, length, _LENGTH.size)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"safetensors header is not valid JSON ({exc})", path=path, fix="the file is corrupt — re-save it"
        ) from None
    if not isinstance(header, dict):
        raise InputError(
            f"safetensors header is a JSON {type(header).__name__}, expected an object",
            path=path,
            fix="the file is corrupt — re-save it",
        )
    return header, _LENGTH.size + length


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise InputError(
            "safetensors '__metadata__' must map strings to strings",
            path=path,
            fix=("the header is corrupt — re-save the file"),
        )
    return meta


def _tensor(path: Path, name: str, info: Any, data_start: int, data_size: int) -> TensorRef:
    def bad(what: str) -> InputError:
        return InputError(
            f"safetensors tensor '{name}' {what}", path=path, fix="the header is corrupt — re-save the file"
        )

    if not isinstance(info, dict):
        raise bad(f"is described by a JSON {type(info).__name__}, expected an object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise bad(f"has dtype {info.get('dtype')!r}, expected one of {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise bad(f"has shape {shape!r}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}, expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"has data_offsets [{begin}, {end}] outside the data section of {data_size} bytes")
    numel = 1
    for s in shape:
        numel *= s
    if end - begin != numel * ITEMSIZE[dtype]:
        raise bad(f"spans {end - begin} bytes but shape {shape} of {dtype} needs {numel * ITEMSIZE[dtype]}")
    stride = tuple(_contiguous_strides(shape))
    storage = StorageRef(path, name, data_start + begin, end - begin, dtype)
    return TensorRef(storage, dtype, tuple(shape), stride)


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _check_overlaps(path: Path, tensors: dict[str, TensorRef]) -> None:
    spans = sorted(
        (t.storage.file_offset, t.storage.file_offset + t.storage.nbytes, n) for n, t in tensors.items()
    )
    for (_, end, name), (begin, _, following) in itertools.pairwise(spans):
        if begin < end:
            raise InputError(
                f"safetensors tensors '{name}' and '{following}' overlap",
                path=path,
                fix=("the header is corrupt — re-save the file"),
            )


def read_safetensors(path: Path) -> Checkpoint:
    """Read a safetensors file's header; tensors stay lazy.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``safetensors``) whose root maps tensor names to TensorRefs in header order
        and whose ``metadata`` is the header's ``__metadata__``.

    Raises:
        InputError: the header length, JSON, dtypes, shapes or offsets are invalid.
    """
    header, data_start = _read_header(path)
    metadata = _metadata(path, header)
    data_size = source_size(path) - data_start
    root = {name: _tensor(path, name, info, data_start, data_size) for name, info in header.items()}
    _check_overlaps(path, root)
    return Checkpoint(
        path=path, format=ContainerFormat.SAFETENSORS, root=root, state_dicts=[], metadata=metadata
    )
