"""Where the readers' bytes come from: a local file (``os.pread``) or an object behind a URL (fsspec).

The readers ask for byte ranges through four calls — :func:`open_read`, :func:`pread`, :func:`fd_size`,
:func:`close` — on integer handles. A local path gets a real file descriptor and the calls are the plain
``os`` ones. A URL (``s3://``, ``gs://``, ``https://``, ``hf://``, any protocol fsspec knows, its package
installed: ``pip install 'bnaudit[remote]'``) gets a handle above every real descriptor: each read becomes
a range request for exactly the bytes of it not fetched before (no rounding to blocks; two missing parts
at most 512 bytes apart in one request), kept in a per-object cache of 64 MiB (:mod:`rangecache`), so the
zip end records and directory, the local headers, the pickle and the BatchNorm storages are fetched once
each and nothing else is. The readers ask for few, large reads (a run of neighbouring local headers with
the small tensors between them, the whole directory) so that the requests stay few as well, and announce
the header runs (:func:`prefetch`) so that those go out concurrently, in one round trip. Each object
counts the bytes and requests it took (:func:`transfer_stats`, recorded in the JSON report).

Failures are one-line InputErrors naming the URL: a missing object, a denied request, and a transfer that
keeps failing — a connection reset, a short or truncated answer — after ``RETRIES`` attempts spaced by
exponential backoff (0.25 s, 0.5 s); a request is never retried more than that. Credentials are the
filesystem package's own (environment variables, config files, instance roles); bnaudit never sees them.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.rangecache import RangeCache
from bnaudit.errors import InputError

RETRIES = 3
BACKOFF_S = 0.25
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$", re.S)
_FINAL_STATUS = frozenset({400, 401, 403, 404, 416})  # answers a retry would only repeat
_LOCAL_SCHEMES = frozenset({"file", "c", "d"})  # file:// and Windows drive letters stay local paths
_HANDLES = itertools.count(1 << 40)
_OPEN: dict[int, RemoteObject] = {}
_OBJECTS: dict[str, RemoteObject] = {}
_LOCK = threading.Lock()


def url_of(path: str | os.PathLike[str]) -> str | None:
    """The URL ``path`` names, or None for a local path.

    ``Path("s3://b/k")`` prints as ``s3:/b/k``: both spellings give ``s3://b/k``.
    """
    match = _URL.match(os.fspath(path))
    if match is None or match.group(1).lower() in _LOCAL_SCHEMES:
        return None
    return f"{match.group(1)}://{match.group(2)}"


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as messages and reports show it: a URL as written, a local path as is."""
    return url_of(path) or os.fspath(path)


def is_remote(path: str | os.PathLike[str]) -> bool:
    return url_of(path) is not None


def url_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path on it (MissingDependencyError without fsspec)."""
    from bnaudit.optional import load

    core = load("fsspec", "a URL input").core
    try:
        return core.url_to_fs(url)  # type: ignore[no-any-return]
    except (ImportError, ValueError) as exc:
        raise InputError(
            f"no filesystem package for this URL ({exc})",
            path=url,
            fix="install it: pip install 'bnaudit[remote]' (s3fs, gcsfs, aiohttp, huggingface_hub as needed)",
        ) from None


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status behind an error (aiohttp's ClientResponseError), also when fsspec re-raised it."""
    for _ in range(4):
        if exc is None:
            return None
        status = getattr(exc, "status", None)
        if isinstance(status, int):
            return status
        exc = exc.__cause__ or exc.__context__
    return None


def remote_error(url: str, exc: BaseException) -> InputError:
    """The one-line error for a failed request (missing, denied, or a transfer that kept failing)."""
    status = _status(exc)
    if status in (401, 403):
        return InputError(
            "access denied", path=url, fix="check the credentials your filesystem package reads"
        )
    if isinstance(exc, FileNotFoundError) or status == 404:
        return InputError("no such object", path=url, fix="check the URL (bucket, key, pattern)")
    if isinstance(exc, PermissionError) or status in (401, 403):
        return InputError(
            "access denied", path=url, fix="check the credentials your filesystem package reads"
        )
    return InputError(
        f"the transfer failed {RETRIES} times ({type(exc).__name__}: {exc})",
        path=url,
        fix="check the network and the server, then run again",
    )


def retrying(url: str, call: Any) -> Any:
    """``call()``, tried up to RETRIES times with backoff; a final failure: the InputError naming ``url``."""
    for attempt in range(RETRIES):
        try:
            return call()
        except FileExistsError:
            raise  # a conditional write refused (If-None-Match): the writer's to report, not a transfer fault
        except (FileNotFoundError, PermissionError) as exc:
            raise remote_error(url, exc) from None
        except Exception as exc:
            if _status(exc) in _FINAL_STATUS or attempt == RETRIES - 1:
                raise remote_error(url, exc) from None
            time.sleep(BACKOFF_S * 2**attempt)  # a reset, a timeout, a short answer: try again
    raise AssertionError("unreachable")


class RemoteObject:
    """One remote object: its size, the byte ranges fetched so far (:class:`RangeCache`), and what
    fetching them cost."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.key = url_filesystem(url)
        info = retrying(url, lambda: self.fs.info(self.key))
        if info.get("type") == "directory":
            raise InputError("is a folder, not an object", path=url, fix="pass the objects (or a pattern)")
        self.size = int(info.get("size") or 0)
        self.bytes_read = 0
        self.requests = 0
        self._cache = RangeCache()
        self._lock = threading.Lock()

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes ``start..end`` in one range request (retried), counted."""

        def get() -> bytes:
            data = self.fs.cat_file(self.key, start=start, end=end)
            if len(data) != end - start:
                raise OSError(f"got {len(data)} of {end - start} bytes at {start} (truncated)")
            return bytes(data)

        data: bytes = retrying(self.url, get)
        self.bytes_read += len(data)
        self.requests += 1
        return data

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch the missing parts of these (offset, size) ranges as concurrent requests (one round trip,
        not one per range). A part that fails or comes back short is left to the read that needs it, which
        fetches it alone, with retries."""
        with self._lock:
            ends = [(at, min(at + size, self.size)) for at, size in ranges]
            wanted = [gap for at, end in ends for gap in self._cache.missing(at, end)]
        if len(wanted) < 2 or not getattr(self.fs, "async_impl", False):
            return  # a synchronous filesystem's cat_ranges is the same requests one after the other
        try:
            answers = self.fs.cat_ranges(
                [self.key] * len(wanted), [w[0] for w in wanted], [w[1] for w in wanted], on_error="return"
            )
        except Exception:  # whatever went wrong is met again, and reported, by the reads
            return
        with self._lock:
            self.requests += len(wanted)
            for (start, end), data in zip(wanted, answers, strict=True):
                if isinstance(data, bytes | bytearray):
                    self.bytes_read += len(data)
                    if len(data) == end - start:
                        self._cache.keep(start, bytes(data))

    def pread(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        if size <= 0 or offset >= end:
            return b""
        with self._lock:
            for start, stop in self._cache.missing(offset, end):
                self._cache.keep(start, self._fetch(start, stop))
            return self._cache.read(offset, end)


def remote_object(url: str) -> RemoteObject:
    """The object behind ``url`` (one per URL per process, so its cache and counts are shared)."""
    with _LOCK:
        found = _OBJECTS.get(url)
    if found is None:
        found = RemoteObject(url)
        with _LOCK:
            found = _OBJECTS.setdefault(url, found)
    return found


def open_read(path: str | os.PathLike[str]) -> int:
    """A handle for reading ``path``: a file descriptor, or a remote object's handle.

    Raises:
        OSError: a local file cannot be opened. InputError: a remote object is missing or unreadable.
    """
    url = url_of(path)
    if url is None:
        return os.open(path, os.O_RDONLY)
    obj = remote_object(url)
    with _LOCK:
        handle = next(_HANDLES)
        _OPEN[handle] = obj
    return handle


def pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end), as ``os.pread``."""
    obj = _OPEN.get(fd)
    return os.pread(fd, size, offset) if obj is None else obj.pread(size, offset)


def prefetch(fd: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Announce the (offset, size) ranges about to be read: a remote object fetches them concurrently, a
    local file does nothing."""
    obj = _OPEN.get(fd)
    if obj is not None:
        obj.prefetch(ranges)


def fd_size(fd: int) -> int:
    obj = _OPEN.get(fd)
    return os.fstat(fd).st_size if obj is None else obj.size


def close(fd: int) -> None:
    with _LOCK:
        obj = _OPEN.pop(fd, None)
    if obj is None:
        os.close(fd)


def file_size(path: str | os.PathLike[str]) -> int:
    """The size of a local file or a remote object."""
    url = url_of(path)
    return Path(path).stat().st_size if url is None else remote_object(url).size


def transfer_stats(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(bytes read, requests) for a remote input read in this process, None for a local one."""
    url = url_of(path)
    if url is None:
        return None
    with _LOCK:
        obj = _OBJECTS.get(url)
    return (obj.bytes_read, obj.requests) if obj is not None else (0, 0)


def read_at(path: str | os.PathLike[str], size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` of a local file or a remote object (one range read)."""
    fd = open_read(path)
    try:
        return pread(fd, size, offset)
    finally:
        close(fd)


def read_head(path: str | os.PathLike[str], size: int) -> bytes:
    """The first ``size`` bytes (fewer for a shorter file) of a local file or a remote object."""
    return read_at(path, size, 0)


def remote_glob(url: str) -> list[str]:
    """The objects a URL pattern matches on its remote filesystem, as URLs, sorted."""
    fs, pattern = url_filesystem(url)
    found = retrying(url, lambda: fs.glob(pattern))
    return sorted(fs.unstrip_protocol(p) if "://" not in p else p for p in found)


def remote_exists(url: str) -> bool:
    """Whether an object exists at ``url`` (for the output policy: never replaced without --force)."""
    fs, key = url_filesystem(url)
    return bool(retrying(url, lambda: fs.exists(key)))
