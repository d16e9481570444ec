"""S3 calls of a server-side patched copy, through s3fs's own client: parts copied or uploaded, cleanup.

Every call goes through ``fs.call_s3`` (s3fs's client, its credentials and endpoint) inside bytesource's
bounded retries, so a failure is the same one-line error naming the URL as a failed read.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bnaudit.checkpoint.bytesource import retrying, url_filesystem
from bnaudit.checkpoint.s3_part_plan import MAX_PART, Part, split_range

log = logging.getLogger(__name__)
# Parts in flight at once: uploaded parts are held in memory (at most 64 MiB each).
PART_THREADS = 4


class S3Object:
    """One object's bucket and key on an s3fs filesystem, and the calls made on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, path = url_filesystem(url)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def call(self, method: str, **kwargs: Any) -> Any:
        """One S3 call on this object's bucket (with ``Key`` unless given), retried as reads are."""
        kw = {"Bucket": self.bucket, "Key": self.key, **kwargs}
        return retrying(self.url, lambda: self.fs.call_s3(method, **kw))

    def same_store(self, other: S3Object) -> bool:
        """Whether a copy from ``other`` can run inside the store (one filesystem: endpoint, credentials)."""
        return self.fs is other.fs or (
            type(self.fs) is type(other.fs) and self.fs.storage_options == other.fs.storage_options
        )

    def sibling(self, tag: str) -> S3Object:
        """A temporary key beside this one (same folder, a hidden name that says what it is)."""
        folder, _, name = self.key.rpartition("/")
        key = f"{folder}/" if folder else ""
        return S3Object(f"s3://{self.bucket}/{key}.{name}.{tag}-{uuid.uuid4().hex[:12]}.bnaudit-tmp")

    def etag(self) -> str:
        return str(self.call("head_object")["ETag"])

    def size(self) -> int:
        return int(self.call("head_object")["ContentLength"])

    def exists(self) -> bool:
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return bool(retrying(self.url, lambda: self.fs.exists(f"{self.bucket}/{self.key}")))

    def get_range(self, start: int, end: int, etag: str) -> bytes:
        """Bytes ``[start, end)``, only if the object is still the version ``etag`` names."""

        async def get() -> bytes:
            resp = await self.fs._call_s3(
                "get_object", Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
            )
            return bytes(await resp["Body"].read())

        def checked() -> bytes:
            from fsspec.asyn import sync  # fsspec is optional: imported only when an object is written

            data: bytes = sync(self.fs.loop, get)
            if len(data) != end - start:
                raise OSError(f"got {len(data)} of {end - start} bytes at {start} (truncated)")
            return data

        return retrying(self.url, checked)  # type: ignore[no-any-return]

    def delete(self) -> None:
        self.call("delete_object")
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")


def copy_source(src: S3Object, start: int, end: int, etag: str) -> dict[str, Any]:
    """The UploadPartCopy arguments for ``[start, end)`` of ``src`` (refused if it changed meanwhile)."""
    return {
        "CopySource": {"Bucket": src.bucket, "Key": src.key},
        "CopySourceRange": f"bytes={start}-{end - 1}",
        "CopySourceIfMatch": etag,
    }


def multipart(
    dst: S3Object,
    parts: Sequence[Part],
    copy_args: Callable[[Part], dict[str, Any]],
    body: Callable[[Part], bytes],
    complete_args: dict[str, Any] | None = None,
) -> None:
    """Write ``dst`` by one multipart upload: a part copied (``copy_args``) or uploaded (``body``) each.

    Parts go ``PART_THREADS`` at a time (a store's per-request latency overlaps). The upload is completed
    (with ``complete_args``: a condition) only when every part is in; on any failure it is aborted, so
    nothing appears.
    """
    upload_id = dst.call("create_multipart_upload")["UploadId"]

    def send(number: int, part: Part) -> dict[str, Any]:
        common = {"PartNumber": number, "UploadId": upload_id}
        if part.copy:
            etag = dst.call("upload_part_copy", **common, **copy_args(part))["CopyPartResult"]["ETag"]
        else:
            data = body(part)
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            etag = dst.call("upload_part", **common, Body=data, ContentMD5=md5)["ETag"]
        return {"PartNumber": number, "ETag": etag}

    try:
        with ThreadPoolExecutor(max_workers=PART_THREADS) as pool:
            sent = [pool.submit(send, n, p) for n, p in enumerate(parts, 1)]
            try:
                done = [f.result() for f in sent]
            except BaseException:
                for future in sent:
                    future.cancel()  # the parts not started yet; the pool waits for the running ones
                raise
        dst.call(
            "complete_multipart_upload",
            UploadId=upload_id,
            MultipartUpload={"Parts": done},
            **(complete_args or {}),
        )
    except BaseException:
        abort(dst, upload_id)
        raise
    dst.fs.invalidate_cache(f"{dst.bucket}/{dst.key}")


def abort(dst: S3Object, upload_id: str) -> None:
    """Abort an unfinished upload (its parts are dropped); a failure to do so is logged, not raised."""
    try:
        dst.call("abort_multipart_upload", UploadId=upload_id)
    except Exception as exc:  # the original failure is the one to report
        log.warning("could not abort the multipart upload of %s (%s); its parts may remain", dst.url, exc)


def copy_whole(src: S3Object, dst: S3Object, size: int, *, replace: bool) -> None:
    """Copy ``src`` to ``dst`` inside the store, by a multipart copy (parts of at most 5 GiB, S3's limit).

    A multipart copy rather than one CopyObject (one request for most files) because its completion takes
    the condition everywhere it matters: without ``replace`` it carries ``If-None-Match: *``, which AWS S3
    (and moto, the test server) honour on CompleteMultipartUpload, so an object another writer put at
    ``dst`` since it was checked is kept and s3fs raises FileExistsError. A store that ignores the header
    replaces it (the check before is all it gets).
    """
    etag = src.etag()
    create_only: dict[str, Any] = {} if replace else {"IfNoneMatch": "*"}
    parts = split_range(0, size, True, MAX_PART)
    multipart(dst, parts, lambda p: copy_source(src, p.start, p.end, etag), lambda p: b"", create_only)


def delete_quietly(obj: S3Object) -> None:
    """Delete a temporary object; a failure is logged (the original error is the one to report)."""
    try:
        obj.delete()
    except Exception as exc:
        log.warning("could not delete the temporary object %s (%s)", obj.url, exc)
