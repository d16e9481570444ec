"""Reader for Hugging Face sharded checkpoints (``*.safetensors.index.json`` / ``*.bin.index.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from bnaudit.checkpoint.bytesource import file_size, read_head, shown, url_of
from bnaudit.checkpoint.detect import detect_format, sharded_index
from bnaudit.checkpoint.remote_folder import is_folder, member_size, record_member, remote_sharded_index
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat, GlobalRef, TensorRef
from bnaudit.errors import InputError

MAX_INDEX_BYTES = 100_000_000
ShardReaders = Mapping[ContainerFormat, Callable[[Path], Checkpoint]]
"""The readers of the formats a shard may have (the registry's single-file formats)."""


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(weight_map, metadata as strings) of an index file."""
    record_member(path.parent, path)
    size = file_size(path)
    if size > MAX_INDEX_BYTES:
        raise InputError(
            f"index file is over {MAX_INDEX_BYTES} bytes",
            path=path,
            fix=("it is not a sharded checkpoint index — pass the *.index.json written by save_pretrained"),
        )
    try:
        index = json.loads(read_head(path, size))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"is not valid JSON ({exc})", path=path, fix="re-download or re-save the index"
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            "'weight_map' must map tensor names to shard file names",
            path=path,
            fix="re-download or re-save the index",
        )
    meta = index.get("metadata")
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return weight_map, metadata


def _index_of(path: Path) -> Path | None:
    """The index a path names: itself, or the one index of its folder (local or remote)."""
    if not is_folder(path):
        return path
    url = url_of(path)
    return sharded_index(path) if url is None else remote_sharded_index(url)


def _shard_path(index: Path, shard: str) -> Path:
    # Shard names come from an untrusted file: keep them inside the index's folder.
    pure = PurePosixPath(shard)
    if not shard or pure.is_absolute() or ".." in pure.parts or "\\" in shard:
        raise InputError(
            f"shard name {shard!r} is not a file name relative to the index's folder",
            path=index,
            fix="fix the weight_map",
        )
    return index.parent / pure


def _read_shard(index: Path, shard: str, readers: ShardReaders) -> Checkpoint:
    path = _shard_path(index, shard)
    if member_size(index.parent, path) is None:
        raise InputError(
            f"shard '{shard}' named in weight_map is missing (looked for {shown(path)})",
            path=index,
            fix="download every shard next to the index",
        )
    fmt = detect_format(path)
    reader = readers.get(fmt)
    if reader is None:
        raise InputError(
            f"shard '{shard}' is {fmt}, expected safetensors or a torch.save file",
            path=index,
            fix="re-save the shards",
        )
    return reader(path)


def read_sharded(path: Path, readers: ShardReaders) -> Checkpoint:
    """Read every shard named by a sharded index and expose one flat state dict.

    Args:
        path: the ``*.index.json`` file, or the folder holding it.
        readers: the reader of each format a shard may have (from :mod:`bnaudit.checkpoint.formats`).

    Returns:
        A Checkpoint (format ``hf-sharded``) whose root maps each tensor name (weight_map order) to a
        TensorRef into its own shard; globals and warnings of every shard are merged; ``metadata`` is the
        index's ``metadata`` as strings.

    Raises:
        InputError: the index is invalid, a shard is missing or unreadable, or a tensor is missing from its
            shard.
    """
    index = _index_of(path)
    if index is None:
        raise InputError("holds no single *.index.json", path=path, fix="pass the index file itself")
    weight_map, metadata = _read_index(index)
    shards: dict[str, Checkpoint] = {}
    root: dict[str, TensorRef] = {}
    refs: list[GlobalRef] = []
    warnings: list[str] = []
    for name, shard in weight_map.items():
        if shard not in shards:
            shards[shard] = ckpt = _read_shard(index, shard, readers)
            refs.extend(ckpt.globals)
            warnings.extend(ckpt.warnings)
        root[name] = _tensor_in(index, shard, shards[shard].root, name)
    return Checkpoint(
        path, ContainerFormat.HF_SHARDED, root, globals=refs, metadata=metadata, warnings=warnings
    )


def _tensor_in(index: Path, shard: str, shard_root: Any, name: str) -> TensorRef:
    value = shard_root.get(name) if isinstance(shard_root, Mapping) else None
    if not isinstance(value, TensorRef):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise InputError(
            f"tensor '{name}' should be in shard '{shard}' but is {found} there",
            path=index,
            fix="the shards do not match the index — re-download or re-save them",
        )
    return value
