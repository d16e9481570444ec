"""Read lazy tensor references into NumPy arrays, and encode float64 values back into a tensor's dtype."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from bnaudit.checkpoint.torchzip import ZIP_READ_ERRORS
from bnaudit.checkpoint.types import ITEMSIZE, NUMPY_DTYPES, TensorRef
from bnaudit.errors import InputError

# Raw unsigned views of the dtypes NumPy cannot represent; they are decoded to float64 by hand.
_RAW_DTYPES = {"bfloat16": "<u2", "float8_e4m3fn": "u1", "float8_e5m2": "u1", "float8_e4m3fnuz": "u1",
               "float8_e5m2fnuz": "u1"}  # fmt: skip


class DtypeOverflowError(InputError, ValueError):
    """A finite value does not fit the target dtype (it would become infinity)."""


def _fp8_table(exp_bits: int, man_bits: int, bias: int, variant: str) -> np.ndarray:
    """The exact float64 value of each of the 256 codes of an fp8 format."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = (codes & ((1 << man_bits) - 1)).astype(np.float64)
    subnormal = man * 2.0 ** (1 - bias - man_bits)
    normal = (1.0 + man / 2.0**man_bits) * np.exp2((exp - bias).astype(np.float64))
    values = sign * np.where(exp == 0, subnormal, normal)
    top = (1 << exp_bits) - 1
    if variant == "fn":  # e4m3fn: no infinities, only S.1111.111 is NaN
        values[(exp == top) & (man == (1 << man_bits) - 1)] = np.nan
    elif variant == "ieee":  # e5m2: IEEE-style infinities and NaNs
        values[(exp == top) & (man == 0)] = sign[(exp == top) & (man == 0)] * np.inf
        values[(exp == top) & (man != 0)] = np.nan
    else:  # fnuz: no infinities, no negative zero; 0x80 is the only NaN
        values[0x80] = np.nan
    return values


_FP8_TABLES = {
    "float8_e4m3fn": _fp8_table(4, 3, 7, "fn"),
    "float8_e5m2": _fp8_table(5, 2, 15, "ieee"),
    "float8_e4m3fnuz": _fp8_table(4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": _fp8_table(5, 2, 16, "fnuz"),
}


def _needed_bytes(ref: TensorRef) -> tuple[int, int]:
    """[start, end) byte range inside the storage covering every element of the tensor."""
    itemsize = ITEMSIZE[ref.dtype]
    start = ref.offset * itemsize
    if ref.numel == 0:
        return start, start
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    return start, (last + 1) * itemsize


def _open_for_reading(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{path}: cannot open for reading ({exc.strerror}); check the path") from None


def _read_plain(ref: TensorRef, start: int, end: int) -> bytes:
    storage = ref.storage
    fd = _open_for_reading(storage.path)
    try:
        # pread of only the bytes the tensor spans: memory never grows with the file's size.
        data = os.pread(fd, end - start, storage.file_offset + start)
    finally:
        os.close(fd)
    return data


def _read_compressed(ref: TensorRef, start: int, end: int) -> bytes:
    storage = ref.storage
    try:
        with zipfile.ZipFile(storage.path) as zf, zf.open(storage.key) as entry:
            entry.read(start)
            return entry.read(end - start)
    except (*ZIP_READ_ERRORS, KeyError) as exc:
        raise InputError(
            f"{storage.path}: cannot decompress zip entry '{storage.key}' ({exc}); "
            "the file is corrupt — re-save it"
        ) from None


def read_tensor(ref: TensorRef) -> np.ndarray:
    """Read one tensor's elements from its file, honouring storage offset and strides.

    Args:
        ref: the lazy tensor reference.

    Returns:
        A new C-contiguous array of ``ref.shape``: float64 for bfloat16 and the fp8 types (exact), the
        tensor's own NumPy dtype otherwise.

    Raises:
        InputError: the storage is shorter than the tensor needs, the file is shorter than the storage, or
            the dtype has no decoder.
    """
    start, end, raw_dtype = _readable_span(ref)
    if ref.numel == 0:
        return _decode(np.zeros(ref.shape, dtype=raw_dtype), ref.dtype)
    data = _read_compressed(ref, start, end) if ref.storage.compressed else _read_plain(ref, start, end)
    return _from_bytes(ref, data, end - start, raw_dtype)


# read_tensors reads neighbouring tensors of one file in one pread when at most this many bytes lie between
# them, and never more than _MAX_RUN_BYTES in one read: a BatchNorm layer's five small tensors sit side by
# side in a torch zip, while a convolution's weights (megabytes) separate one layer from the next.
_MAX_GAP_BYTES = 64 << 10
_MAX_RUN_BYTES = 4 << 20


def read_tensors(refs: Sequence[TensorRef], path: Path | None = None) -> list[np.ndarray]:
    """Read many tensors, as :func:`read_tensor` would one by one, with one open per file.

    Tensors stored next to each other are read in one ``pread``, so a model's BatchNorm statistics cost a
    few system calls per layer rather than one open, read and close per tensor. Memory stays at the
    tensors plus at most one read run (:data:`_MAX_RUN_BYTES`).

    Args:
        refs: lazy tensor references, from any files.
        path: read every uncompressed storage from this file, at the offsets the references give, instead of
            from the file each names: a file proven to share their file's layout
            (:mod:`bnaudit.checkpoint.same_layout`, which accepts no compressed or assembled tensor).

    Returns:
        The arrays, in the order of ``refs``.

    Raises:
        InputError: as :func:`read_tensor`.
    """
    out: list[np.ndarray | None] = [None] * len(refs)
    by_file: dict[Path, list[tuple[int, int, int, np.dtype[Any]]]] = {}
    for index, ref in enumerate(refs):
        if type(ref) is not TensorRef:  # assembled or refused by its own to_numpy (DCP chunks)
            out[index] = ref.to_numpy()
            continue
        start, end, raw_dtype = _readable_span(ref)
        if ref.storage.compressed or ref.numel == 0:
            out[index] = read_tensor(ref)
            continue
        base = ref.storage.file_offset
        source = ref.storage.path if path is None else path
        by_file.setdefault(source, []).append((base + start, base + end, index, raw_dtype))
    for source, spans in by_file.items():
        fd = _open_for_reading(source)
        try:
            for run in _coalesce(sorted(spans)):
                run_start, run_end = run[0][0], max(span[1] for span in run)
                data = os.pread(fd, run_end - run_start, run_start)
                for start, end, index, raw_dtype in run:
                    chunk = data[start - run_start : end - run_start]
                    out[index] = _from_bytes(refs[index], chunk, end - start, raw_dtype)
        finally:
            os.close(fd)
    assert all(array is not None for array in out)  # every index was filled above
    return cast(list[np.ndarray], out)


def _coalesce(
    spans: list[tuple[int, int, int, np.dtype[Any]]],
) -> Iterator[list[tuple[int, int, int, np.dtype[Any]]]]:
    """Group spans sorted by start into runs that one pread covers (small gaps, bounded size)."""
    run = [spans[0]]
    run_end = spans[0][1]
    for span in spans[1:]:
        if span[0] - run_end <= _MAX_GAP_BYTES and max(run_end, span[1]) - run[0][0] <= _MAX_RUN_BYTES:
            run.append(span)
            run_end = max(run_end, span[1])
            continue
        yield run
        run, run_end = [span], span[1]
    yield run


def _readable_span(ref: TensorRef) -> tuple[int, int, np.dtype[Any]]:
    """The tensor's [start, end) bytes in its storage and the raw dtype to read them as; checks both."""
    storage = ref.storage
    if ref.dtype not in NUMPY_DTYPES and ref.dtype not in _RAW_DTYPES:
        raise InputError(
            f"{storage.path}: storage '{storage.key}' holds dtype {ref.dtype}, which bnaudit cannot "
            "decode; convert the tensor to float32 before saving"
        )
    start, end = _needed_bytes(ref)
    if end > storage.nbytes:
        raise InputError(
            f"{storage.path}: storage '{storage.key}' is {storage.nbytes} bytes but a {ref.dtype} tensor of "
            f"shape {list(ref.shape)} at offset {ref.offset} needs {end}; "
            "the file is truncated or corrupt — re-save it"
        )
    return start, end, np.dtype(_RAW_DTYPES.get(ref.dtype) or NUMPY_DTYPES[ref.dtype])


def _from_bytes(ref: TensorRef, data: bytes, expected: int, raw_dtype: np.dtype[Any]) -> np.ndarray:
    """The tensor's array from the ``expected`` bytes of its span (a new, writable, C-contiguous array)."""
    storage = ref.storage
    if len(data) != expected:
        raise InputError(
            f"{storage.path}: storage '{storage.key}' should hold {storage.nbytes} bytes at offset "
            f"{storage.file_offset} but the file ends early; the file is truncated — re-save or copy it again"
        )
    flat = np.frombuffer(data, dtype=raw_dtype)
    if ref.is_contiguous():
        return _decode(flat.reshape(ref.shape).copy(), ref.dtype)
    strides = tuple(s * raw_dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat, shape=ref.shape, strides=strides, writeable=False)
    return _decode(view.copy(), ref.dtype)


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: shift the bits back into place.
        with np.errstate(invalid="ignore"):  # signalling NaN codes widen to quiet NaNs, as in torch
            return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    table = _FP8_TABLES.get(dtype)
    if table is not None:
        return table[raw]
    return raw


def _check_overflow(values: np.ndarray, encoded: np.ndarray, dtype: str) -> None:
    bad = np.isfinite(values) & ~np.isfinite(encoded)
    if bad.any():
        first = float(values[bad].flat[0])
        raise DtypeOverflowError(
            f"value {first!r} does not fit {dtype} (it would become infinity); "
            "the statistics are out of range for this dtype — check the inputs or save in float32"
        )


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    # torch converts float64 -> float32 -> bfloat16 (round to nearest even on the float32 bits); do the same
    # so the bytes written equal torch's.
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(f32)] = 0x7FC0  # torch writes every NaN as the canonical quiet NaN
    return out


def encode_like(values: np.ndarray, dtype: str) -> bytes:
    """Convert float64 values to the raw little-endian bytes of ``dtype``, as torch would convert them.

    Args:
        values: the values, any shape; written in C order.
        dtype: ``float16``, ``bfloat16``, ``float32``, ``float64`` or an integer dtype (values must be
            integral and in range).

    Returns:
        ``values.size * itemsize`` bytes.

    Raises:
        DtypeOverflowError: a finite value becomes infinite in ``dtype``, or an integer is out of range
            (also a ``ValueError``).
        ValueError: the dtype is not supported for writing.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    if dtype == "bfloat16":
        bits = _to_bfloat16_bits(values)
        _check_overflow(values, _decode(bits, "bfloat16"), dtype)
        return bits.astype("<u2").tobytes()
    if dtype in ("float16", "float32", "float64"):
        with np.errstate(over="ignore"):
            # float16 goes through float32 like torch's double -> half conversion.
            wide = values.astype(np.float32) if dtype == "float16" else values
            encoded = wide.astype(NUMPY_DTYPES[dtype])
        _check_overflow(values, encoded, dtype)
        return encoded.tobytes()
    if dtype in NUMPY_DTYPES and dtype.startswith(("int", "uint")):
        info = np.iinfo(np.dtype(NUMPY_DTYPES[dtype]))
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise DtypeOverflowError(
                f"{dtype} needs integral values; got non-integer values — round them first"
            )
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise DtypeOverflowError(f"values {values.min()}..{values.max()} do not fit {dtype}")
        return values.astype(NUMPY_DTYPES[dtype]).tobytes()
    raise ValueError(
        f"encode_like cannot write dtype {dtype}; supported: float16, bfloat16, float32, float64, ints"
    )
