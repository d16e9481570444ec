"""Repairs of folder checkpoints (sharded, DCP) whose input or output folder is behind a URL.

- A remote input folder is mirrored first: each of its files (those a listing shows, and every member the
  reader read: the index or ``.metadata`` and each shard or ``.distcp`` file) is downloaded once, whole, into
  a temporary folder beside the output (so that the writer can hard-link the unchanged large files into the
  new folder instead of copying them again); the mirror is read, the patches are aimed at its tensors (same
  keys, same offsets) and the local folder writer builds the repaired folder from it. The mirror is removed
  afterwards, and on a signal.
- A remote output folder (``-o s3://bucket/fixed``) is built and verified locally first (a temporary
  folder), then uploaded file by file: an old index or ``.metadata`` at the target (``--force``) is deleted
  first, then the data files are uploaded, then the index (or ``.metadata``) last, then the sidecar. A
  reader that starts from the index therefore sees the old folder, no checkpoint, or the whole new one —
  never a new index naming a missing shard. An object store has no atomic folder: each object appears
  whole (S3 makes an object visible when its upload completes), but the folder does not appear at once, a
  reader that lists the folder mid-upload sees some new data files, and with ``--force`` a reader that
  read the old index before the upload may then read new shards; files of the old folder that the new one
  lacks are left in place. A failure or a signal before the index is up deletes the files uploaded so
  far; without ``--force`` every upload is conditional on S3 (``If-None-Match: *``), so another writer's
  files that appeared meanwhile are never replaced.
- Everything else goes to :func:`bnaudit.checkpoint.remote_write.write_repaired` unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypedDict, Unpack

from bnaudit.checkpoint.bytesource import retrying, url_filesystem, url_of
from bnaudit.checkpoint.folder_writer import FOLDER_FORMATS, write_checkpoint
from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.checkpoint.patch_plan import TensorPatch, WriteResult
from bnaudit.checkpoint.remote_folder import METADATA_NAME, folder_files, folder_members, is_folder
from bnaudit.checkpoint.remote_write import put_file, write_repaired
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat
from bnaudit.checkpoint.writer import Companions
from bnaudit.errors import OutputError
from bnaudit.temp_registry import LIVE_TEMPS, signals_raise

log = logging.getLogger(__name__)


class RepairWrite(TypedDict, total=False):
    """The keyword arguments of :func:`bnaudit.checkpoint.remote_write.write_repaired`."""

    replace_existing: bool
    metadata: Mapping[str, str] | None
    companions: Companions | None


def write_repair(
    ckpt: Checkpoint, patches: Sequence[TensorPatch], out: Path | str, **options: Unpack[RepairWrite]
) -> WriteResult:
    """Write the repaired copy of ``ckpt`` at ``out`` (a folder input or output may be a URL); ``options``
    as :func:`bnaudit.checkpoint.remote_write.write_repaired` takes them.

    Raises:
        as ``write_repaired``; InputError naming the URL for a failed download or upload; OutputError for
        an output folder that is the input folder.
    """
    replace_existing = options.get("replace_existing", False)
    metadata, companions = options.get("metadata"), options.get("companions")
    folder = ckpt.format in FOLDER_FORMATS
    source, target = url_of(ckpt.path) if folder else None, url_of(out) if folder else None
    if source is None and target is None:
        return write_repaired(ckpt, patches, out, **options)
    with contextlib.ExitStack() as stack:
        if source is not None:
            if target is not None and target.rstrip("/") == url_of(_folder_of(ckpt)):
                raise OutputError("is the input folder", path=target, fix="write the repair to a new folder")
            beside = Path(tempfile.gettempdir()) if target is not None else Path(out).parent
            mirror = _mirror(ckpt, stack.enter_context(_temp_folder(beside, "mirror")))
            patches = [replace(p, ref=mirror.state_dict(p.state_dict).tensors[p.key]) for p in patches]
            ckpt = mirror
        if target is None:
            return write_checkpoint(
                ckpt, patches, Path(out), replace=replace_existing, metadata=metadata, companions=companions
            )
        staging = stack.enter_context(_temp_folder(Path(tempfile.gettempdir()), "upload"))
        return _write_then_upload(ckpt, patches, target, (metadata, companions, replace_existing), staging)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _temp_folder(beside: Path, what: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f".bnaudit-{what}-", suffix=".bnaudit-tmp", dir=beside) as tmp:
        path = Path(tmp)
        LIVE_TEMPS.add(path)  # removed on SIGTERM/SIGHUP too
        try:
            yield path
        finally:
            LIVE_TEMPS.discard(path)


def _folder_of(ckpt: Checkpoint) -> Path:
    """The remote folder of a folder checkpoint (its path, or the folder of its index URL)."""
    return ckpt.path if ckpt.format is ContainerFormat.DCP or is_folder(ckpt.path) else ckpt.path.parent


def _mirror(ckpt: Checkpoint, tmp: Path) -> Checkpoint:
    """Download every file of the remote folder once into ``tmp/<folder name>``; the local copy, read."""
    folder = _folder_of(ckpt)
    folder_url = str(url_of(folder))
    members = [m[len(folder_url) + 1 :] for m in folder_members(folder) if m.startswith(folder_url + "/")]
    names = sorted(set(folder_files(folder_url)) | set(members))
    local = tmp / folder.name
    for name in names:
        url = f"{folder_url}/{name}"
        fs, key = url_filesystem(url)
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        retrying(url, lambda fs=fs, key=key, dst=local / name: fs.get_file(key, str(dst)))
    log.info("downloaded %d files of %s into %s", len(names), folder_url, local)
    return load_checkpoint(local if ckpt.path == folder else local / ckpt.path.name)


def _upload_files(local_out: Path, target: str, files: list[str], replace_existing: bool) -> None:
    """The data files, then the index / ``.metadata`` last. Until the index is up, any failure (SIGTERM and
    SIGHUP included: ``signals_raise``) deletes the files uploaded so far: a folder without its index is
    no checkpoint, and nothing of this run is left in it."""
    fs, root = url_filesystem(target)
    uploaded: list[str] = []
    try:
        with signals_raise():
            for name in sorted(files, key=_is_index):
                put_file(local_out / name, f"{target}/{name}", create_only=not replace_existing)
                uploaded.append(name)
    except BaseException:
        for name in uploaded:
            try:
                fs.rm_file(f"{root}/{name}")
            except Exception as exc:  # the original failure is the one to report
                log.warning("could not delete %s/%s after a failed upload (%s)", target, name, exc)
        raise


def _is_index(name: str) -> bool:
    return name == METADATA_NAME or name.endswith(".index.json")


def _write_then_upload(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    target: str,
    docs: tuple[Mapping[str, str] | None, Companions | None, bool],
    staging: Path,
) -> WriteResult:
    metadata, companions, replace_existing = docs
    target = target.rstrip("/")
    local_out = staging / target.rsplit("/", 1)[-1]
    written: list[tuple[Path, str]] = []

    def keep(result: WriteResult) -> list[tuple[Path, str]]:
        written.extend(companions(replace(result, path=Path(target))) if companions else [])
        return []

    result = write_checkpoint(ckpt, patches, local_out, metadata=metadata, companions=keep)
    files = sorted(p.relative_to(local_out).as_posix() for p in local_out.rglob("*") if p.is_file())
    fs, root = url_filesystem(target)
    # --force: an old index first, so that no reader starts from it mid-upload (without --force an index
    # there is another writer's, which the conditional upload refuses to replace)
    for name in filter(_is_index, files if replace_existing else []):
        if retrying(target, lambda name=name: fs.exists(f"{root}/{name}")):
            retrying(target, lambda name=name: fs.rm_file(f"{root}/{name}"))
    _upload_files(local_out, target, files, replace_existing)
    for path, text in written:  # the sidecar, after the folder it describes
        side = staging / "sidecar.json"
        side.write_text(text, encoding="utf-8")
        put_file(side, url_of(path) or str(path), create_only=False)
    how = f"{len(files)} files uploaded one by one, the index or .metadata last"
    log.info("uploaded %s: %s", target, how)
    return replace(result, path=Path(target), upload=how)
