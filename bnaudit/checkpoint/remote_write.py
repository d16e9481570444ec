"""Repairs whose reference or output is behind a URL: what :func:`write_repaired` adds to the local writer.

- An S3 reference written to an S3 output on the same store (one s3fs filesystem) is not downloaded: the
  output is written by a multipart upload that copies the unchanged byte ranges server-side and uploads
  only the parts holding patched bytes, verified on a temporary key before it is copied to the target
  (:mod:`bnaudit.checkpoint.s3_range_copy`). A file with nothing to copy (too small) takes the path below.
- Otherwise a remote reference is downloaded once into a temporary file beside the output (the output is a
  copy of it anyway), read there, and patched like a local file; its sha256 is that of the bytes downloaded.
- A remote output (``-o s3://bucket/fixed.pt``) is then written and verified locally first (a temporary
  file, the byte-patching writer's checks), then uploaded: a single-part upload for a small file, else a
  multipart upload that is completed only once every part is in, so a reader sees the whole object or none
  (S3 makes an object visible only when its upload completes). Without ``--force`` the S3 write is
  conditional (``If-None-Match: *``): an object that appeared at the target meanwhile is kept.

The sidecar is uploaded after the checkpoint, either way. The path taken is logged and recorded in the
result (``upload``) and in average's JSON report.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from bnaudit.checkpoint.bytesource import retrying, url_filesystem, url_of
from bnaudit.checkpoint.folder_writer import write_checkpoint
from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.checkpoint.patch_plan import TensorPatch, WriteResult
from bnaudit.checkpoint.s3_range_copy import same_store, write_server_side
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.writer import Companions
from bnaudit.errors import OutputError
from bnaudit.temp_registry import LIVE_TEMPS

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _temp_file(folder: Path, name: str) -> Iterator[Path]:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".bnaudit-tmp", dir=folder)
    os.close(fd)
    path = Path(tmp)
    LIVE_TEMPS.add(path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        LIVE_TEMPS.discard(path)


def _download(url: str, dst: Path) -> None:
    fs, key = url_filesystem(url)
    retrying(url, lambda: fs.get_file(key, str(dst)))


def _local_patches(local: Checkpoint, patches: Sequence[TensorPatch]) -> list[TensorPatch]:
    """The same patches, aimed at the downloaded copy's tensors (same keys, same offsets)."""
    return [replace(p, ref=local.state_dict(p.state_dict).tensors[p.key]) for p in patches]


def put_file(local: Path, url: str, *, create_only: bool) -> None:
    """Upload ``local`` to ``url`` (retried); ``create_only`` on S3: conditional on no object being there
    (s3fs's ``mode="create"``, ``If-None-Match: *``), OutputError if one appeared since the check."""
    fs, key = url_filesystem(url)
    mode = {"mode": "create"} if create_only and url.startswith("s3://") else {}
    try:
        retrying(url, lambda: fs.put_file(str(local), key, **mode))
    except FileExistsError:
        raise OutputError("already exists", path=url, where="-o", fix="pass --force to replace it") from None


def _upload(local: Path, url: str, replace_existing: bool) -> str:
    """Upload a verified file; which path was taken (single part, or multipart completed at the end).

    Without ``replace_existing`` an S3 upload is conditional (s3fs's ``mode="create"``: ``If-None-Match: *``
    on the PUT or on the completion), so an object another writer put there since the check is kept.
    """
    size = local.stat().st_size
    # s3fs (and gcsfs) switch to a multipart upload above their block size and complete it last.
    how = "multipart upload, completed after every part" if size > 5 << 20 else "single-part upload"
    put_file(local, url, create_only=not replace_existing)
    log.info("uploaded %s (%d bytes): %s", url, size, how)
    return how


def write_repaired(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    out: Path | str,
    *,
    replace_existing: bool = False,
    metadata: Mapping[str, str] | None = None,
    companions: Companions | None = None,
) -> WriteResult:
    """Write the repaired copy of ``ckpt`` at ``out``; either may be a URL (see the module docstring).

    Raises:
        as :func:`bnaudit.checkpoint.folder_writer.write_checkpoint`; InputError for a failed download,
        OutputError for a failed upload (nothing is left at the URL: an unfinished upload is not an object).
    """
    source, target = url_of(ckpt.path), url_of(out)
    if target is not None and target == source:
        raise OutputError("is the reference", path=target, where="-o", fix="write the repair to another key")
    if source is not None and target is not None and same_store(source, target):
        done = write_server_side(ckpt, patches, target, metadata=metadata, replace=replace_existing)
        if done is not None:
            _upload_companions(done, companions, target)
            return done
    folder = Path(tempfile.gettempdir()) if target is not None else Path(out).parent
    with contextlib.ExitStack() as stack:
        if source is not None:
            local = stack.enter_context(_temp_file(folder, "reference"))
            _download(source, local)
            ckpt_local = load_checkpoint(local)
            patches = _local_patches(ckpt_local, patches)
            ckpt = ckpt_local
        if target is None:
            return write_checkpoint(
                ckpt, patches, Path(out), replace=replace_existing, metadata=metadata, companions=companions
            )
        return _write_then_upload(ckpt, patches, target, (metadata, companions, replace_existing), stack)
    raise AssertionError("unreachable")


def _write_then_upload(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    target: str,
    options: tuple[Mapping[str, str] | None, Companions | None, bool],
    stack: contextlib.ExitStack,
) -> WriteResult:
    metadata, companions, replace_existing = options
    staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnaudit-upload-")))
    local_out = staging / target.rsplit("/", 1)[-1]
    result = write_checkpoint(ckpt, patches, local_out, metadata=metadata)
    how = _upload(local_out, target, replace_existing)
    done = replace(result, path=Path(target), upload=how)
    _upload_companions(done, companions, target)
    return done


def _upload_companions(result: WriteResult, companions: Companions | None, target: str) -> None:
    """The sidecar, uploaded after the checkpoint it describes (one PUT: it appears whole or not at all)."""
    for path, text in companions(result) if companions else []:
        url = url_of(path) or str(path)
        fs, key = url_filesystem(url)
        retrying(url, functools.partial(fs.pipe_file, key, text.encode("utf-8")))
        log.info("uploaded %s (%d bytes) after %s", url, len(text), target)
