"""Folder checkpoints behind a URL: a Hugging Face sharded folder or a torch.distributed.checkpoint folder.

A remote folder is named three ways:

- the folder itself (``s3://bucket/run/hf/``, ``gs://...``): a "directory" of its filesystem package
  (``fs.isdir``), listed with ``fs.ls``; over plain HTTP(S), only when the server answers the folder URL
  with an HTML listing (``Content-Type: text/html``), which most servers do not;
- the sharded index (``.../model.safetensors.index.json``): recognised by its content like a local one; the
  shards are the files its ``weight_map`` names, next to it — no listing needed, so this works over any
  HTTP server;
- the DCP ``.metadata`` object (``.../dcp_step100/.metadata``): the folder is its parent, the data files
  are those the metadata names — no listing needed either.

Every member (index, ``.metadata``, shard, ``.distcp`` file) is read with range requests through
:mod:`bnaudit.checkpoint.bytesource`, which counts the bytes and requests per object; the members read
are recorded per folder here, so that a report gives a folder input the sum of its members' counts.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from pathlib import Path

from bnaudit.checkpoint.bytesource import (
    file_size,
    retrying,
    transfer_stats,
    url_filesystem,
    url_of,
)
from bnaudit.checkpoint.types import ContainerFormat
from bnaudit.errors import InputError

METADATA_NAME = ".metadata"
INDEX_PATTERNS = ("*.safetensors.index.json", "*.bin.index.json")
_HTTP = frozenset({"http", "https"})
_FOLDERS: dict[str, list[tuple[str, str]] | None] = {}  # URL -> (name, type) of its listing, or None
_MEMBERS: dict[str, list[str]] = {}  # folder URL -> the member URLs read, in order
_LOCK = threading.Lock()


def _key(url: str) -> str:
    return url.rstrip("/")


def _listing(url: str) -> list[tuple[str, str]] | None:
    """(name, "file" or "directory") of each entry of a remote folder, or None when ``url`` is no folder
    (asked once per URL per process)."""
    key = _key(url)
    with _LOCK:
        if key in _FOLDERS:
            return _FOLDERS[key]
    found = _list(url, key)
    with _LOCK:
        return _FOLDERS.setdefault(key, found)


def _list(url: str, key: str) -> list[tuple[str, str]] | None:
    fs, path = url_filesystem(key)
    try:
        if url.split(":", 1)[0].lower() in _HTTP:
            # Every HTTP URL is also a file: only an HTML answer can be a listing (never a checkpoint).
            if fs.info(path).get("mimetype") != "text/html":
                return None
            path = path + "/"
        elif not fs.isdir(path):
            return None
        entries = retrying(url, lambda: fs.ls(path, detail=True))
    except InputError:
        raise
    except Exception:  # a denied or missing URL is no folder: reading it as an object says why
        return None
    return [(str(e["name"]).rstrip("/").rsplit("/", 1)[-1], str(e.get("type", "file"))) for e in entries]


def is_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder: a local directory, or a listable remote folder."""
    url = url_of(path)
    return Path(path).is_dir() if url is None else _listing(url) is not None


def folder_files(url: str) -> list[str]:
    """The names of the files directly in a listable remote folder (sorted; none when not listable)."""
    return sorted(name for name, kind in _listing(url) or [] if kind != "directory")


def remote_folder_format(path: str | os.PathLike[str]) -> ContainerFormat | None:
    """The folder format behind a URL (a DCP ``.metadata`` URL counts as its folder), None for an object.

    Raises:
        InputError: a remote folder with neither ``.metadata`` nor one ``*.index.json``.
    """
    url = url_of(path)
    if url is None:
        return None
    if _key(url).rsplit("/", 1)[-1] == METADATA_NAME:
        return ContainerFormat.DCP
    if _listing(url) is None:
        return None
    kind = folder_kind(folder_files(url))
    if kind is None:
        raise InputError(
            "is a remote folder without a .metadata file or a single *.index.json",
            path=url,
            fix="pass a torch.distributed.checkpoint folder, a Hugging Face sharded folder, or its index URL",
        )
    return kind


def folder_kind(names: list[str]) -> ContainerFormat | None:
    """DCP for a folder whose files include ``.metadata``, sharded for one with one index, else None."""
    if METADATA_NAME in names:
        return ContainerFormat.DCP
    return ContainerFormat.HF_SHARDED if index_name(names) is not None else None


def index_name(names: list[str]) -> str | None:
    """The one ``*.safetensors.index.json`` (else ``*.bin.index.json``) among a folder's file names."""
    for pattern in INDEX_PATTERNS:
        found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if len(found) == 1:
            return found[0]
    return None


def remote_sharded_index(url: str) -> Path | None:
    """The one sharded index of a remote folder (:func:`index_name`), or None."""
    name = index_name(folder_files(url))
    return None if name is None else Path(f"{_key(url)}/{name}")


def dcp_folder(path: Path) -> Path:
    """The DCP folder a path names: itself, or the parent of a remote ``.metadata`` URL."""
    url = url_of(path)
    if url is not None and _key(url).rsplit("/", 1)[-1] == METADATA_NAME:
        return path.parent
    return path


def record_member(folder: Path, member: Path) -> None:
    """Note that ``member`` of the remote ``folder`` is read (nothing for a local one)."""
    folder_url, member_url = url_of(folder), url_of(member)
    if folder_url is None or member_url is None:
        return
    with _LOCK:
        members = _MEMBERS.setdefault(_key(folder_url), [])
        if member_url not in members:
            members.append(member_url)


def member_size(folder: Path, member: Path) -> int | None:
    """The size of a folder's member file, None when it is missing; a remote member is recorded.

    Raises:
        InputError: a remote member that exists but cannot be read (access denied, a failing transfer).
    """
    if url_of(member) is None:
        return member.stat().st_size if member.is_file() else None
    record_member(folder, member)
    try:
        return file_size(member)
    except InputError as exc:
        if exc.fields.problem == "no such object":
            return None
        raise


def folder_members(folder: Path) -> list[str]:
    """The member URLs of a remote folder read so far in this process, in the order they were read."""
    url = url_of(folder)
    with _LOCK:
        return list(_MEMBERS.get(_key(url), [])) if url is not None else []


def input_transfer_stats(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(bytes read, requests) for a remote input: an object's own counts, a folder's summed over the members
    read (a folder named by its index or ``.metadata`` URL too); None for a local input."""
    url = url_of(path)
    if url is None:
        return None
    key = _key(url)
    with _LOCK:
        members = _MEMBERS.get(key)
        if members is None and (key.endswith(".index.json") or key.endswith("/" + METADATA_NAME)):
            members = _MEMBERS.get(key.rsplit("/", 1)[0])
        members = list(members) if members is not None else None
    if members is None:
        return transfer_stats(path)
    counts = [transfer_stats(m) or (0, 0) for m in members]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)
