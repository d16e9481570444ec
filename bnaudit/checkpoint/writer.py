"""The byte-patching writer: copy a reference checkpoint, overwrite only the bytes of the changed tensors."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bnaudit.atomic_output import AtomicOutput
from bnaudit.checkpoint.formats import FormatSpec, format_spec
from bnaudit.checkpoint.output_policy import OutputKind, PlannedOutput, check_outputs
from bnaudit.checkpoint.patch_fixups import FixupPlan, data_start
from bnaudit.checkpoint.patch_plan import ByteRange, TensorPatch, WriteResult, plan_patches
from bnaudit.checkpoint.patch_verify import Expected, verify_bytes, verify_reload

# The two verification steps tests replace by name in this module (a failure injected mid-write).
from bnaudit.checkpoint.patch_verify import verification_failed as _verification_failed
from bnaudit.checkpoint.patch_verify import verify_zip as _verify_zip
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.errors import UnsupportedFormatError

__all__ = ["ByteRange", "TensorPatch", "WriteResult", "check_output_path", "plan_patches", "write_patched"]

_CHUNK = 4 << 20
_KERNEL_CHUNK = 1 << 30
# copy_file_range errors that mean "not here" (another file system, an old kernel, a special file).
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
Companions = Callable[[WriteResult], list[tuple[Path, str]]]


def check_output_path(out: Path, inputs: list[Path], force: bool, companions: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that would overwrite an input, an existing file without ``force``, or lack a folder.

    The library's entry to :func:`bnaudit.checkpoint.output_policy.check_outputs` for a checkpoint and its
    sidecar (the CLI checks every output of a command, reports included, the same way).

    Args:
        out: the checkpoint to write.
        inputs: every file read (never overwritten, even with ``force``).
        force: allow replacing an existing output that is not an input.
        companions: files written together with ``out`` (the provenance sidecar).

    Raises:
        OutputError: the folder is missing, a target is a directory, an input, or exists without ``force``.
    """
    planned = [PlannedOutput(out, OutputKind.CHECKPOINT, "-o")]
    planned += [PlannedOutput(c, OutputKind.SIDECAR, "-o's sidecar") for c in companions]
    check_outputs(planned, inputs, force=force)


def _copy(src: Path, dst_fd: int, header: bytes | None) -> None:
    """Copy ``src`` to ``dst_fd`` (with a replaced safetensors header when given), inside the kernel.

    The bytes do not pass through Python: the verification pass reads both files anyway, and hashes them.
    """
    src_fd = os.open(src, os.O_RDONLY)
    try:
        offset = 0
        if header is not None:
            _write_all(dst_fd, header)
            offset = data_start(src)
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


def _patchable_spec(ckpt: Checkpoint) -> FormatSpec:
    spec = format_spec(ckpt.format)
    if spec.fixups is None:
        raise UnsupportedFormatError(
            f"{ckpt.format} checkpoints cannot be written by bnaudit (supported: torch.save files and single "
            ".safetensors files)",
            path=ckpt.path,
            fix="convert it to one file first, or average the shards' source checkpoints",
        )
    return spec


def _write_output(
    tmp: Path, ckpt: Checkpoint, ranges: list[ByteRange], fixed: FixupPlan, spec: FormatSpec
) -> None:
    """Copy the reference to ``tmp``, write the patches, then apply the container's fix-ups."""
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        _copy(ckpt.path, fd, fixed.header)
        _apply(fd, ranges, fixed.shift)
    finally:
        os.close(fd)
    assert spec.fixups is not None  # checked by _patchable_spec
    fd = os.open(tmp, os.O_RDWR)
    try:
        spec.fixups.apply(fd, fixed)
    finally:
        os.close(fd)


def _verify(
    tmp: Path,
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    ranges: list[ByteRange],
    fixed: FixupPlan,
    spec: FormatSpec,
) -> tuple[str, str]:
    """Every check of the written output; the sha256 of the reference and of the output."""
    allowed = [(r.offset + fixed.shift, r.end + fixed.shift) for r in ranges] + fixed.allowed()
    digests = verify_bytes(tmp, ckpt.path, Expected(fixed.shift, fixed.header_end, allowed), ranges)
    assert spec.fixups is not None  # checked by _patchable_spec
    problem = spec.fixups.problem(ckpt.path, tmp, fixed)
    if problem is not None:
        raise _verification_failed(tmp, problem)
    _verify_zip(tmp, fixed.crc_entries, fixed.shift)
    verify_reload(tmp, patches, ranges, fixed.shift)
    return digests


def write_patched(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    out: Path,
    *,
    metadata: Mapping[str, str] | None = None,
    companions: Companions | None = None,
    replace: bool = False,
) -> WriteResult:
    """Write ``out``: a copy of the reference checkpoint with only the patched tensors' bytes changed.

    The reference is copied while hashing it; each patched tensor's bytes are overwritten in place; the
    format's fix-ups follow (the registry's: a torch zip's CRC-32s in every copy, a safetensors header with
    ``metadata`` added). The temporary output is then read back and verified — sizes, every byte outside
    the patches identical to the reference, the patched bytes, the fix-ups, and the tensors as read by
    bnaudit's reader — before it is fsynced and renamed over ``out``. Output path checks (existing file,
    inputs) are the caller's, with :func:`check_output_path`.

    Args:
        ckpt: the reference checkpoint, as returned by ``load_checkpoint``.
        patches: the tensors to rewrite, with their new float64 values.
        out: the output path.
        metadata: entries to add to a safetensors header's ``__metadata__`` (ignored for torch files).
        companions: called with the result before the rename; the (path, text) files it returns are written
            and renamed together with ``out`` (the provenance sidecar).
        replace: whether ``out`` and the companions may replace existing files (``--force``); without it a
            file that appeared meanwhile (another process writing the same output) is an OutputError.

    Returns:
        The WriteResult.

    Raises:
        UnsupportedFormatError: the format cannot be patched, or patching in place would not be safe (see
            :func:`plan_patches`).
        DtypeOverflowError: a value does not fit its tensor's dtype (nothing is written).
        OutputError: the disk is full or the output cannot be written (nothing is left behind).
        InternalError: the verification failed (nothing is left behind).
    """
    spec = _patchable_spec(ckpt)
    assert spec.fixups is not None
    ranges = plan_patches(ckpt, patches)
    fixed = spec.fixups.plan(ckpt, ranges, metadata or {})
    with AtomicOutput(out, replace=replace) as staged:
        _write_output(staged.tmp, ckpt, ranges, fixed, spec)
        ref_sha, out_sha = _verify(staged.tmp, ckpt, patches, ranges, fixed, spec)
        crc_names = tuple(e.name for e in fixed.crc_entries)
        result = WriteResult(out, ckpt.format, ref_sha, out_sha, ranges, crc_names, dict(fixed.metadata))
        for path, text in companions(result) if companions else []:
            staged.add_companion(path, text)
        staged.commit()
    return result
