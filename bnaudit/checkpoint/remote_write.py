"""Repairs whose reference or output is behind a URL: what :func:`write_repaired` adds to the local writer.

- A remote reference is downloaded once into a temporary file beside the output (the output is a copy of it
  anyway), read there, and patched like a local file; its sha256 is that of the bytes downloaded.
- A remote output (``-o s3://bucket/fixed.pt``) is written and verified locally first (a temporary file,
  the byte-patching writer's checks), then uploaded: a single-part upload for a small file, else a multipart
  upload that is completed only once every part is in, so a reader sees the whole object or none (S3 makes
  an object visible only when its upload completes). The sidecar is uploaded after the checkpoint. The path
  taken is logged and recorded in the result (``upload``).
"""

from __future__ import annotations

import contextlib
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
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.writer import Companions
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


def _upload(local: Path, url: str) -> str:
    """Upload a verified file; which path was taken (single part, or multipart completed at the end)."""
    fs, key = url_filesystem(url)
    size = local.stat().st_size
    # s3fs (and gcsfs) switch to a multipart upload above their block size and complete it last.
    how = "multipart upload, completed after every part" if size > 5 << 20 else "single-part upload"
    retrying(url, lambda: fs.put_file(str(local), key))
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
        return _write_then_upload(ckpt, patches, target, metadata, companions, stack)
    raise AssertionError("unreachable")


def _write_then_upload(
    ckpt: Checkpoint,
    patches: Sequence[TensorPatch],
    target: str,
    metadata: Mapping[str, str] | None,
    companions: Companions | None,
    stack: contextlib.ExitStack,
) -> WriteResult:
    staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnaudit-upload-")))
    local_out = staging / target.rsplit("/", 1)[-1]
    written: list[tuple[Path, str]] = []

    def keep(result: WriteResult) -> list[tuple[Path, str]]:
        docs = companions(replace(result, path=Path(target))) if companions else []
        written.extend(docs)
        return []

    result = write_checkpoint(ckpt, patches, local_out, metadata=metadata, companions=keep)
    how = _upload(local_out, target)
    for path, text in written:  # the sidecar, after the checkpoint it describes
        side = staging / (local_out.name + ".sidecar")
        side.write_text(text, encoding="utf-8")
        _upload(side, url_of(path) or str(path))
    return replace(result, path=Path(target), upload=how)
