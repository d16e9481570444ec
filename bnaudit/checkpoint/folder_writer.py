"""Repaired copies of folder checkpoints (Hugging Face sharded folders, torch.distributed.checkpoint folders).

A new folder is built beside the output (:class:`bnaudit.atomic_folder.AtomicFolder`): each data file that
holds a patched statistic is byte-patched — a shard through :func:`bnaudit.checkpoint.writer.write_patched`
(safetensors header or zip CRC fix-ups, verified), a ``.distcp`` file through
:mod:`bnaudit.checkpoint.dcp_patch` — and every other file (the index, ``config.json``, ``.metadata``, the
shards without statistics) is hard-linked when it is large and the file system allows it, else copied.
The finished folder is read back with bnaudit's reader and every patched tensor's bytes compared before
the folder is renamed into place; the provenance sidecar (``OUT.bnaudit.json``) is renamed next to it
just after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from bnaudit.atomic_folder import AtomicFolder
from bnaudit.atomic_output import AtomicOutput
from bnaudit.checkpoint.convert import tensor_bytes
from bnaudit.checkpoint.dcp_patch import FilePatch, patch_data_file
from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.checkpoint.patch_plan import TensorPatch, WriteResult, refuse
from bnaudit.checkpoint.patch_verify import verification_failed
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat, StorageRef
from bnaudit.checkpoint.writer import Companions, write_patched

FOLDER_FORMATS = frozenset({ContainerFormat.HF_SHARDED, ContainerFormat.DCP})
# Files up to this size are copied (an index, a config: a later edit of the output must not reach the
# input); bigger unchanged ones are hard-linked, which costs no space and no time.
_COPY_BELOW = 1 << 20
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def source_folder(ckpt: Checkpoint) -> Path:
    """The folder a folder checkpoint's files lie in (a sharded index's folder, or the DCP folder)."""
    return ckpt.path if ckpt.path.is_dir() else ckpt.path.parent


def write_checkpoint(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    out: Path,
    *,
    replace: bool = False,
    metadata: Mapping[str, str] | None = None,
    companions: Companions | None = None,
) -> WriteResult:
    """Write the repaired copy of ``ckpt``: one file (:func:`write_patched`) or, for a folder, a new folder.

    Arguments as :func:`bnaudit.checkpoint.writer.write_patched`; for a folder, ``out`` is the new folder
    (``metadata`` goes into each patched safetensors shard's header) and the result's digests are those of
    the manifest of patched files (``name sha256`` lines, sorted).
    """
    if ckpt.format not in FOLDER_FORMATS:
        return write_patched(ckpt, patches, out, metadata=metadata, companions=companions, replace=replace)
    src = source_folder(ckpt)
    groups = _by_file(ckpt, patches, src)
    with contextlib.ExitStack() as stack:
        staged = stack.enter_context(AtomicFolder(out, replace=replace))
        done = [_patch_file(ckpt, f, group, staged.tmp / f.relative_to(src), metadata) for f, group in groups]
        _link_rest(src, staged.tmp, {f for f, _ in groups})
        _verify_folder(
            staged.tmp / ckpt.path.relative_to(src) if ckpt.path != src else staged.tmp, patches, done
        )
        result = _result(out, ckpt.format, done, metadata)
        sidecars = []
        for path, text in companions(result) if companions else []:
            sidecars.append(stack.enter_context(AtomicOutput(path, replace=replace)))
            sidecars[-1].write(text.encode("utf-8"))
        staged.commit()
        for sidecar in sidecars:
            sidecar.commit()
    return result


def _by_file(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], src: Path
) -> list[tuple[Path, list[TensorPatch]]]:
    """The patches grouped by the data file holding their bytes (refusing one outside the folder)."""
    groups: dict[Path, list[TensorPatch]] = {}
    for patch in patches:
        location = patch.ref.location
        if not isinstance(location, StorageRef) or location.path.parent != src:
            what = (
                "is saved in chunks (sharded)" if not isinstance(location, StorageRef) else "lies elsewhere"
            )
            raise refuse(ckpt, f"tensor '{patch.label}' {what}")
        groups.setdefault(location.path, []).append(patch)
    return sorted(groups.items())


def _patch_file(
    ckpt: Checkpoint, data_file: Path, group: list[TensorPatch], out: Path, metadata: Mapping[str, str] | None
) -> FilePatch:
    out.parent.mkdir(parents=True, exist_ok=True)
    if ckpt.format is ContainerFormat.DCP:
        return patch_data_file(ckpt, data_file, group, out)
    shard = load_checkpoint(data_file)
    written = write_patched(shard, group, out, metadata=metadata)
    assert written.reference_sha256 and written.output_sha256  # a local write hashes both files
    return FilePatch(
        data_file.name, written.ranges, written.crc_entries, written.reference_sha256, written.output_sha256
    )


def _link_rest(src: Path, dst: Path, patched: set[Path]) -> None:
    """Every other file of ``src`` into ``dst``: large ones hard-linked where possible, the rest copied."""
    for root, dirs, files in os.walk(src):
        dirs.sort()
        here = Path(root)
        target = dst / here.relative_to(src)
        target.mkdir(exist_ok=True)
        for name in sorted(files):
            path = here / name
            if path in patched:
                continue
            if path.stat().st_size > _COPY_BELOW:
                try:
                    os.link(path, target / name)
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_LINK:
                        raise
            shutil.copyfile(path, target / name)


def _verify_folder(written: Path, patches: Sequence[TensorPatch], done: list[FilePatch]) -> None:
    """The new folder read back by bnaudit's reader: every patched tensor in place with its new bytes."""
    back = load_checkpoint(written)
    planned = {r.label: r.data for f in done for r in f.ranges}
    for patch in patches:
        try:
            ref = back.state_dict(patch.state_dict).tensors[patch.key]
        except KeyError:
            raise verification_failed(written, f"tensor '{patch.label}' is missing when read back") from None
        if (ref.dtype, ref.shape) != (patch.ref.dtype, patch.ref.shape):
            raise verification_failed(written, f"tensor '{patch.label}' changed its dtype or shape")
        if tensor_bytes(ref) != planned.get(patch.label):
            raise verification_failed(written, f"tensor '{patch.label}' does not read back as computed")
        read_tensor(ref)  # and the reader decodes it


def _result(
    out: Path, fmt: ContainerFormat, done: list[FilePatch], metadata: Mapping[str, str] | None
) -> WriteResult:
    ref_manifest = "".join(f"{f.name} {f.reference_sha256}\n" for f in sorted(done, key=lambda f: f.name))
    out_manifest = "".join(f"{f.name} {f.output_sha256}\n" for f in sorted(done, key=lambda f: f.name))
    return WriteResult(
        out,
        fmt,
        hashlib.sha256(ref_manifest.encode()).hexdigest(),
        hashlib.sha256(out_manifest.encode()).hexdigest(),
        [r for f in done for r in f.ranges],
        tuple(f"{f.name}:{e}" for f in done for e in f.crc_entries),
        dict(metadata or {}) if fmt is ContainerFormat.HF_SHARDED else {},
    )
