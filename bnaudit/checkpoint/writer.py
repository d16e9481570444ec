"""The byte-patching writer: copy a reference checkpoint, overwrite only the bytes of the changed tensors."""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from bnaudit.checkpoint.tensors import DtypeOverflowError, encode_like, read_tensor
from bnaudit.checkpoint.types import Checkpoint, Placeholder, StorageRef, TensorRef
from bnaudit.checkpoint.zippatch import EntryCrc, crc32_range, locate_entries, rewrite_crc
from bnaudit.errors import InputError, InternalError, OutputError, UnsupportedFormatError

PATCHABLE_FORMATS = ("torch-zip", "torch-legacy", "safetensors")
_CHUNK = 4 << 20
_KERNEL_CHUNK = 1 << 30
# copy_file_range errors that mean "not here" (another file system, an old kernel, a special file).
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
_LENGTH = struct.Struct("<Q")

# ------------------------------------------------------------------------------------------ atomic output

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def check_output_path(out: Path, inputs: list[Path], force: bool, companions: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that would overwrite an input, an existing file without ``force``, or lack a folder.

    Args:
        out: the checkpoint to write.
        inputs: every file read (never overwritten, even with ``force``).
        force: allow replacing an existing output that is not an input.
        companions: files written together with ``out`` (the provenance sidecar).

    Raises:
        OutputError: the folder is missing, a target is a directory, an input, or exists without ``force``.
    """
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{out}: the folder {folder} does not exist; create it or choose another -o path")
    for target in (out, *companions):
        if target.is_dir():
            raise OutputError(f"{target}: is a directory; pass a file name to -o")
        if not target.exists():
            continue
        for src in inputs:
            if src.exists() and os.path.samefile(target, src):
                raise OutputError(
                    f"{target}: is one of the inputs ({src}); bnaudit never writes over an input, even "
                    "with --force — choose another -o path"
                )
        if not force:
            raise OutputError(
                f"{target}: already exists; pass --force to replace it or choose another -o path"
            )


def disk_error(path: Path, exc: OSError) -> OutputError:
    """The one-line OutputError for a failed write (disk full, file too large, permissions)."""
    if exc.errno in _DISK_FULL:
        return OutputError(
            f"{path}: the disk is full or the file size limit was reached ({exc.strerror}); nothing was "
            "written — free space or choose another -o folder"
        )
    return OutputError(
        f"{path}: cannot write ({exc.strerror or exc}); nothing was written — check the folder"
    )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicOutput:
    """A file written through a temporary sibling and renamed into place by :meth:`commit`.

    Used as a context manager: leaving the block without ``commit`` (an exception, Ctrl-C) removes every
    temporary file, so the target is either the complete new file or untouched. ``OSError`` raised inside the
    block becomes a one-line :class:`OutputError` (disk full, file size limit).
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.folder = target.parent if str(target.parent) else Path(".")
        self.tmp = self._temp_for(target)
        self._companions: list[tuple[Path, Path]] = []
        self._committed = False

    def _temp_for(self, target: Path) -> Path:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bnaudit-tmp", dir=self.folder)
        except OSError as exc:
            raise disk_error(target, exc) from None
        try:
            # mkstemp creates files readable by the owner only; give the output the permissions a plain
            # open() would (0666 less the umask), as a checkpoint written by torch.save has.
            os.fchmod(fd, 0o666 & ~_current_umask())
        finally:
            os.close(fd)
        return Path(name)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.discard()
        if isinstance(exc, OSError):
            raise disk_error(self.target, exc) from None

    def add_companion(self, target: Path, text: str) -> None:
        """Write a small text file now, under a temporary name that :meth:`commit` renames."""
        tmp = self._temp_for(target)
        self._companions.append((tmp, target))
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def commit(self) -> None:
        """fsync the temporary files, rename them over their targets, fsync the folder."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.target)
        for tmp, target in self._companions:
            os.replace(tmp, target)
        self._committed = True
        try:
            dir_fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return  # some platforms cannot open folders; the rename is done
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        """Remove every temporary file (safe to call twice)."""
        for tmp in (self.tmp, *(t for t, _ in self._companions)):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ planning


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
    entry: str | None = None  # the zip entry holding the bytes, whose CRC must be rewritten

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


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


def _refuse(ckpt: Checkpoint, what: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"{ckpt.path}: {what}; bnaudit patches statistics in place only when that is safe — re-save the "
        "checkpoint with torch.save(model.state_dict()) or write a new file with --to"
    )


def _span(ref: TensorRef) -> tuple[int, int]:
    return ref.byte_span()


def _encode(ckpt: Checkpoint, patch: TensorPatch) -> bytes:
    ref = patch.ref
    if tuple(np.shape(patch.values)) != ref.shape:
        raise InternalError(
            f"{patch.label}: new values have shape {np.shape(patch.values)}, expected {ref.shape}"
        )
    try:
        return encode_like(np.asarray(patch.values, dtype=np.float64), ref.dtype)
    except DtypeOverflowError as exc:
        raise DtypeOverflowError(f"{ckpt.path}: tensor '{patch.label}': {exc}; nothing was written") from None
    except ValueError as exc:
        raise UnsupportedFormatError(f"{ckpt.path}: tensor '{patch.label}': {exc}") from None


def encode_patches(ckpt: Checkpoint, patches: Sequence[TensorPatch]) -> list[bytes]:
    """Each patch's values as raw bytes of its tensor's dtype (bf16 rounded to nearest even).

    Raises:
        DtypeOverflowError: a value does not fit the tensor's dtype; the message names the file and tensor.
    """
    return [_encode(ckpt, p) for p in patches]


def _check_target(ckpt: Checkpoint, patch: TensorPatch) -> None:
    ref = patch.ref
    if ref.storage.path != ckpt.path:
        raise _refuse(ckpt, f"tensor '{patch.label}' lives in another file ({ref.storage.path})")
    if ref.storage.compressed:
        raise _refuse(ckpt, f"tensor '{patch.label}' is stored in a compressed zip entry '{ref.storage.key}'")
    if not ref.is_contiguous():
        raise _refuse(ckpt, f"tensor '{patch.label}' is not contiguous (stride {list(ref.stride)})")
    end = _span(ref)[1]
    if end - ref.storage.file_offset > ref.storage.nbytes:
        raise InputError(
            f"{ckpt.path}: tensor '{patch.label}' needs {end - ref.storage.file_offset} bytes of storage "
            f"'{ref.storage.key}', which holds {ref.storage.nbytes}; the file is corrupt — re-save it"
        )


def _check_overlaps(ckpt: Checkpoint, ranges: list[ByteRange], targets: set[TensorRef]) -> None:
    """Refuse when patched bytes are shared with a tensor or storage that is not rewritten identically."""
    ordered = sorted(ranges, key=lambda r: r.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.end and (a.offset, a.data) != (b.offset, b.data):
            raise _refuse(ckpt, f"tensors '{a.label}' and '{b.label}' share bytes but get different values")
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
            raise _refuse(ckpt, f"the storage of '{label}' is shared with {what} that would change with it")


def plan_patches(ckpt: Checkpoint, patches: Sequence[TensorPatch]) -> list[ByteRange]:
    """Encode every patch and check that overwriting its bytes in place changes nothing else.

    Args:
        ckpt: the reference checkpoint (torch zip, legacy torch or safetensors).
        patches: the tensors to rewrite.

    Returns:
        The byte ranges to write, in file order.

    Raises:
        UnsupportedFormatError: the format cannot be patched, or a target is compressed, non-contiguous, in
            another file, or shares bytes with a tensor that is not rewritten identically.
        DtypeOverflowError: a value does not fit the tensor's dtype.
    """
    if ckpt.format not in PATCHABLE_FORMATS:
        raise UnsupportedFormatError(
            f"{ckpt.path}: {ckpt.format} checkpoints cannot be written by bnaudit (supported: torch.save "
            "files and single .safetensors files); convert it to one file first, or average the shards' "
            "source checkpoints"
        )
    ranges: list[ByteRange] = []
    for patch in patches:
        _check_target(ckpt, patch)
        entry = patch.ref.storage.key if ckpt.format == "torch-zip" else None
        ranges.append(ByteRange(_span(patch.ref)[0], _encode(ckpt, patch), patch.label, entry))
    _check_overlaps(ckpt, ranges, {p.ref for p in patches})
    return sorted(ranges, key=lambda r: r.offset)


def _zip_entries(ckpt: Checkpoint, ranges: list[ByteRange]) -> list[EntryCrc]:
    located = locate_entries(ckpt.path)
    out: dict[str, EntryCrc] = {}
    for r in ranges:
        assert r.entry is not None
        entry = located.get(r.entry)
        if (
            entry is None
            or not entry.data_offset <= r.offset <= r.end <= entry.data_offset + entry.stored_size
        ):
            raise InputError(
                f"{ckpt.path}: the bytes of '{r.label}' do not lie inside zip entry '{r.entry}'; the file is "
                "corrupt — re-save it"
            )
        if entry.compressed:
            raise _refuse(ckpt, f"zip entry '{entry.name}' holding '{r.label}' is compressed")
        out[entry.name] = entry
    return list(out.values())


# ------------------------------------------------------------------------------------------ safetensors


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
    header = json.loads(_read_header_text(path))
    meta = dict(header.get("__metadata__") or {})
    meta.update(entries)
    new: dict[str, Any] = {"__metadata__": meta}
    new.update((k, v) for k, v in header.items() if k != "__metadata__")
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return _LENGTH.pack(len(text)) + text


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return _LENGTH.size + _LENGTH.unpack(f.read(_LENGTH.size))[0]


# ------------------------------------------------------------------------------------------ writing


@dataclass
class WriteResult:
    """What :func:`write_patched` wrote.

    Attributes:
        path: the output.
        format: its container format (the reference's).
        reference_sha256: sha256 of the reference file, computed while copying it.
        output_sha256: sha256 of the output, computed while verifying it.
        ranges: the byte ranges rewritten (offsets in the reference).
        crc_entries: the zip entries whose CRC-32 was recomputed.
        metadata: the entries added to a safetensors header.
    """

    path: Path
    format: str
    reference_sha256: str
    output_sha256: str
    ranges: list[ByteRange]
    crc_entries: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _copy(src: Path, dst_fd: int, header: bytes | None) -> None:
    """Copy ``src`` to ``dst_fd`` (with a replaced safetensors header when given), inside the kernel.

    The bytes do not pass through Python: the verification pass reads both files anyway, and hashes them.
    """
    src_fd = os.open(src, os.O_RDONLY)
    try:
        offset = 0
        if header is not None:
            _write_all(dst_fd, header)
            offset = _data_start(src)
        _copy_range(src_fd, dst_fd, offset, os.fstat(src_fd).st_size - offset)
    finally:
        os.close(src_fd)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to ``dst_fd``: copy_file_range, else read/write."""
    kernel_copy = hasattr(os, "copy_file_range")
    while count > 0:
        if kernel_copy:
            try:
                done = os.copy_file_range(src_fd, dst_fd, min(count, _KERNEL_CHUNK), offset)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel_copy = False  # this file system or kernel cannot: copy the rest through memory
                continue
        else:
            chunk = os.pread(src_fd, min(count, _CHUNK), offset)
            _write_all(dst_fd, chunk)
            done = len(chunk)
        if done == 0:
            raise OSError(errno.EIO, f"the input ended {count} bytes early while it was being copied")
        offset, count = offset + done, count - done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _apply(fd: int, ranges: list[ByteRange], shift: int) -> None:
    for r in ranges:
        _write_at(fd, r.data, r.offset + shift)


@dataclass
class _Expected:
    """What the output must look like: the shift of the data, and the output ranges allowed to differ."""

    shift: int
    header_end: int  # output bytes before this are the (rewritten) safetensors header; 0 otherwise
    allowed: list[tuple[int, int]]


def _verify_bytes(tmp: Path, reference: Path, exp: _Expected, ranges: list[ByteRange]) -> tuple[str, str]:
    """Stream the output against the reference; return the sha256 of the reference and of the output."""
    ref_digest, out_digest = hashlib.sha256(), hashlib.sha256()
    allowed = sorted(exp.allowed)
    out_size, ref_size = tmp.stat().st_size, reference.stat().st_size
    if out_size != ref_size + exp.shift:
        raise _verification_failed(tmp, f"size {out_size}, expected {ref_size + exp.shift}")
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
                raise _verification_failed(tmp, f"the bytes of '{r.label}' are not the values computed")
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
        raise _verification_failed(tmp, f"byte {pos + first} differs from the reference outside the patches")


def _verification_failed(path: Path, what: str) -> InternalError:
    return InternalError(
        f"{path}: verification of the written checkpoint failed: {what}; nothing was written — this is a "
        "bug in bnaudit, please report it"
    )


def _verify_zip(tmp: Path, entries: list[EntryCrc], shift: int) -> None:
    if not entries:
        return
    fd = os.open(tmp, os.O_RDONLY)
    try:
        for entry in entries:
            crc = crc32_range(fd, entry.data_offset + shift, entry.stored_size)
            for f in entry.crc_fields:
                if struct.unpack("<L", os.pread(fd, 4, f + shift))[0] != crc:
                    raise _verification_failed(tmp, f"the CRC-32 of zip entry '{entry.name}' is stale")
    finally:
        os.close(fd)
    try:
        with zipfile.ZipFile(tmp) as zf:
            for entry in entries:
                # zipfile checks the CRC when an entry is read to its end.
                with zf.open(entry.name) as handle:
                    while handle.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError) as exc:
        raise _verification_failed(tmp, f"zipfile rejects the archive ({exc})") from None


def _verify_reload(tmp: Path, patches: Sequence[TensorPatch], ranges: list[ByteRange], shift: int) -> None:
    from bnaudit.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(tmp)
    except InputError as exc:
        raise _verification_failed(tmp, f"the output cannot be read back ({exc})") from None
    by_label = {r.label: r for r in ranges}
    for patch in patches:
        try:
            ref = ckpt.state_dict(patch.state_dict).tensors[patch.key]
        except KeyError:
            raise _verification_failed(tmp, f"tensor '{patch.label}' is missing when read back") from None
        if _span(ref)[0] != by_label[patch.label].offset + shift:
            raise _verification_failed(tmp, f"tensor '{patch.label}' moved")
        expected = read_tensor(replace_storage(patch.ref, tmp, shift))
        if not np.array_equal(ref.to_numpy(), expected, equal_nan=True):
            raise _verification_failed(tmp, f"tensor '{patch.label}' does not read back as computed")


def replace_storage(ref: TensorRef, path: Path, shift: int) -> TensorRef:
    """The same tensor in another file whose bytes are displaced by ``shift``."""
    from dataclasses import replace

    return replace(ref, storage=replace(ref.storage, path=path, file_offset=ref.storage.file_offset + shift))


def write_patched(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    out: Path,
    *,
    metadata: Mapping[str, str] | None = None,
    companions: Callable[[WriteResult], list[tuple[Path, str]]] | None = None,
) -> WriteResult:
    """Write ``out``: a copy of the reference checkpoint with only the patched tensors' bytes changed.

    The reference is copied while hashing it; each patched tensor's bytes are overwritten in place; for a
    torch zip the CRC-32 of each patched entry is recomputed and written to its local header (when it holds
    one), data descriptor and central directory record; a safetensors header gets ``metadata`` added. The
    temporary output is then read back and verified — sizes, every byte outside the patches identical to
    the reference, the patched bytes, the CRCs, and the tensors as read by bnaudit's reader — before it is
    fsynced and renamed over ``out``. Output path checks (existing file, inputs) are the caller's, with
    :func:`check_output_path`.

    Args:
        ckpt: the reference checkpoint, as returned by ``load_checkpoint``.
        patches: the tensors to rewrite, with their new float64 values.
        out: the output path.
        metadata: entries to add to a safetensors header's ``__metadata__`` (ignored for torch files).
        companions: called with the result before the rename; the (path, text) files it returns are written
            and renamed together with ``out`` (the provenance sidecar).

    Returns:
        The WriteResult.

    Raises:
        UnsupportedFormatError: patching in place would not be safe (see :func:`plan_patches`).
        DtypeOverflowError: a value does not fit its tensor's dtype (nothing is written).
        OutputError: the disk is full or the output cannot be written (nothing is left behind).
        InternalError: the verification failed (nothing is left behind).
    """
    ranges = plan_patches(ckpt, patches)
    entries = _zip_entries(ckpt, ranges) if ckpt.format == "torch-zip" else []
    header = safetensors_header_with(ckpt.path, metadata or {}) if ckpt.format == "safetensors" else None
    shift = 0 if header is None else len(header) - _data_start(ckpt.path)
    with AtomicOutput(out) as staged:
        fd = os.open(staged.tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _copy(ckpt.path, fd, header)
            _apply(fd, ranges, shift)
        finally:
            os.close(fd)
        if entries:
            fd = os.open(staged.tmp, os.O_RDWR)
            try:
                for entry in entries:
                    rewrite_crc(fd, entry, shift)
            finally:
                os.close(fd)
        allowed = [(r.offset + shift, r.end + shift) for r in ranges]
        allowed += [(f + shift, f + shift + 4) for e in entries for f in e.crc_fields]
        exp = _Expected(shift, 0 if header is None else len(header), allowed)
        ref_sha, out_sha = _verify_bytes(staged.tmp, ckpt.path, exp, ranges)
        if header is not None and not _header_ok(ckpt.path, staged.tmp, metadata or {}):
            raise _verification_failed(staged.tmp, "the safetensors header changed beyond the metadata")
        _verify_zip(staged.tmp, entries, shift)
        _verify_reload(staged.tmp, patches, ranges, shift)
        result = WriteResult(
            out,
            ckpt.format,
            ref_sha,
            out_sha,
            ranges,
            [e.name for e in entries],
            dict(metadata or {}) if header is not None else {},
        )
        for path, text in companions(result) if companions else []:
            staged.add_companion(path, text)
        staged.commit()
    return result


def _header_ok(reference: Path, out: Path, metadata: Mapping[str, str]) -> bool:
    old, new = json.loads(_read_header_text(reference)), json.loads(_read_header_text(out))
    old_meta = dict(old.pop("__metadata__", None) or {})
    new_meta = dict(new.pop("__metadata__", None) or {})
    return old == new and new_meta == {**old_meta, **metadata} and list(old) == list(new)


__all__ = [
    "AtomicOutput",
    "ByteRange",
    "TensorPatch",
    "WriteResult",
    "check_output_path",
    "disk_error",
    "encode_patches",
    "iter_refs",
    "plan_patches",
    "safetensors_header_with",
    "write_patched",
]
