"""Read lazy tensor references into NumPy arrays, and encode float64 values back into a tensor's dtype."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from bnaudit.checkpoint.bytesource import close, is_remote, open_read, pread
from bnaudit.checkpoint.tensor_codec import RAW_DTYPES, decode
from bnaudit.checkpoint.types import (
    ITEMSIZE,
    NUMPY_DTYPES,
    ChunkedTensor,
    RefusedTensor,
    StorageRef,
    TensorRef,
)
from bnaudit.checkpoint.zipdir import ZipFormatError, read_directory
from bnaudit.checkpoint.zipentries import inflate_prefix, locate_entries
from bnaudit.errors import InputError


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
        return open_read(path)
    except OSError as exc:
        raise InputError(
            f"cannot open for reading ({exc.strerror})", path=path, fix="check the path"
        ) from None


def _read_plain(ref: TensorRef, start: int, end: int) -> bytes:
    storage = ref.storage
    if storage.inline is not None:
        return storage.inline[start:end]
    fd = _open_for_reading(storage.path)
    try:
        # pread of only the bytes the tensor spans: memory never grows with the file's size.
        data = pread(fd, end - start, storage.file_offset + start)
    finally:
        close(fd)
    return data


def _read_compressed(ref: TensorRef, start: int, end: int) -> bytes:
    storage = ref.storage
    fd = _open_for_reading(storage.path)
    try:
        entry = locate_entries(fd, read_directory(fd)).get(storage.key)
        if entry is None:
            raise ZipFormatError(f"there is no entry '{storage.key}'")
        return inflate_prefix(fd, entry, end)[start:]
    except ZipFormatError as exc:
        raise InputError(
            f"cannot decompress zip entry '{storage.key}' ({exc})",
            path=storage.path,
            fix="the file is corrupt — re-save it",
        ) from None
    finally:
        close(fd)


def _assemble(ref: TensorRef, chunked: ChunkedTensor) -> np.ndarray:
    """Read every chunk and place it; refuse when the chunks do not cover the tensor exactly once."""
    out: np.ndarray | None = None
    covered = np.zeros(ref.shape, dtype=np.uint8)
    for offsets, chunk in chunked.chunks:
        values = read_tensor(chunk)
        where = tuple(slice(o, o + n) for o, n in zip(offsets, chunk.shape, strict=True))
        if out is None:
            out = np.zeros(ref.shape, dtype=values.dtype)
        out[where] = values
        covered[where] += 1
    if out is None or not np.all(covered == 1):
        raise InputError(
            f"the {len(chunked.chunks)} saved chunks do not cover the tensor of shape {list(ref.shape)} "
            "exactly once; the checkpoint is incomplete or corrupt",
            path=chunked.display,
            fix="convert it with torch.distributed.checkpoint.format_utils.dcp_to_torch_save and audit the "
            "result",
        )
    return out


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
    location = ref.location
    if isinstance(location, ChunkedTensor):
        return _assemble(ref, location)
    if isinstance(location, RefusedTensor):
        raise InputError(
            f"{location.why}, which bnaudit does not read", path=location.folder, fix=location.fix
        )
    start, end, raw_dtype = _readable_span(ref)
    if ref.numel == 0:
        return decode(np.zeros(ref.shape, dtype=raw_dtype), ref.dtype)
    data = _read_compressed(ref, start, end) if ref.storage.compressed else _read_plain(ref, start, end)
    return _from_bytes(ref, data, end - start, raw_dtype)


# read_tensors reads neighbouring tensors of one file in one pread when at most this many bytes lie between
# them, and never more than _MAX_RUN_BYTES in one read: a BatchNorm layer's five small tensors sit side by
# side in a torch zip, while a convolution's weights (megabytes) separate one layer from the next.
_MAX_GAP_BYTES = 64 << 10
# Over a network the bytes between count: only the local headers between one layer's tensors are bridged
# (the bytes of those runs were fetched with the local headers already, see zipentries.locate_entries).
_REMOTE_GAP_BYTES = 512
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
        storage = ref.location
        if not isinstance(storage, StorageRef) or not storage.in_file or ref.numel == 0:
            out[index] = read_tensor(ref)  # assembled, refused, compressed, inline or empty: one by one
            continue
        start, end, raw_dtype = _readable_span(ref)
        base = storage.file_offset
        source = storage.path if path is None else path
        by_file.setdefault(source, []).append((base + start, base + end, index, raw_dtype))
    for source, spans in by_file.items():
        fd = _open_for_reading(source)
        try:
            for run in _coalesce(sorted(spans), _REMOTE_GAP_BYTES if is_remote(source) else _MAX_GAP_BYTES):
                run_start, run_end = run[0][0], max(span[1] for span in run)
                data = pread(fd, run_end - run_start, run_start)
                for start, end, index, raw_dtype in run:
                    chunk = data[start - run_start : end - run_start]
                    out[index] = _from_bytes(refs[index], chunk, end - start, raw_dtype)
        finally:
            close(fd)
    assert all(array is not None for array in out)  # every index was filled above
    return cast(list[np.ndarray], out)


def _coalesce(
    spans: list[tuple[int, int, int, np.dtype[Any]]], max_gap: int
) -> Iterator[list[tuple[int, int, int, np.dtype[Any]]]]:
    """Group spans sorted by start into runs that one pread covers (small gaps, bounded size)."""
    run = [spans[0]]
    run_end = spans[0][1]
    for span in spans[1:]:
        if span[0] - run_end <= max_gap and max(run_end, span[1]) - run[0][0] <= _MAX_RUN_BYTES:
            run.append(span)
            run_end = max(run_end, span[1])
            continue
        yield run
        run, run_end = [span], span[1]
    yield run


def _readable_span(ref: TensorRef) -> tuple[int, int, np.dtype[Any]]:
    """The tensor's [start, end) bytes in its storage and the raw dtype to read them as; checks both."""
    storage = ref.storage
    if ref.dtype not in NUMPY_DTYPES and ref.dtype not in RAW_DTYPES:
        raise InputError(
            f"storage '{storage.key}' holds dtype {ref.dtype}, which bnaudit cannot decode",
            path=storage.path,
            fix="convert the tensor to float32 before saving",
        )
    start, end = _needed_bytes(ref)
    if end > storage.nbytes:
        raise InputError(
            (
                f"storage '{storage.key}' is {storage.nbytes} bytes but a {ref.dtype} tensor of "
                f"shape {list(ref.shape)} at offset {ref.offset} needs {end}"
            ),
            path=storage.path,
            fix="the file is truncated or corrupt — re-save it",
        )
    return start, end, np.dtype(RAW_DTYPES.get(ref.dtype) or NUMPY_DTYPES[ref.dtype])


def _from_bytes(ref: TensorRef, data: bytes, expected: int, raw_dtype: np.dtype[Any]) -> np.ndarray:
    """The tensor's array from the ``expected`` bytes of its span (a new, writable, C-contiguous array)."""
    storage = ref.storage
    if len(data) != expected:
        raise InputError(
            (
                f"storage '{storage.key}' should hold {storage.nbytes} bytes at offset "
                f"{storage.file_offset} but the file ends early"
            ),
            path=storage.path,
            fix="the file is truncated — re-save or copy it again",
        )
    flat = np.frombuffer(data, dtype=raw_dtype)
    if ref.is_contiguous():
        return decode(flat.reshape(ref.shape).copy(), ref.dtype)
    strides = tuple(s * raw_dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat, shape=ref.shape, strides=strides, writeable=False)
    return decode(view.copy(), ref.dtype)
