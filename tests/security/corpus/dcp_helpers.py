"""Distributed checkpoint folders written by the real torch.distributed.checkpoint.save."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

from tests.security.corpus.carriers import bn_state


def save_dcp(folder: Path) -> Path:
    """A single-process DCP save of a BatchNorm state dict plus a non-tensor item (stored as bytes)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": bn_state(), "epoch": 3}, checkpoint_id=str(folder), no_dist=True)
    return folder


def redirect_bytes_item(folder: Path, item_bytes: bytes, length: int | None = None) -> Path:
    """Point the folder's non-tensor item at a new data file holding ``item_bytes`` (metadata stays real),
    the file and item extended to ``length`` bytes with a hole of zeros when given."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = folder / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())  # our own benign file, just written by dcp.save
    size = len(item_bytes) if length is None else length
    with open(folder / "__evil_0.distcp", "wb") as data:
        data.write(item_bytes)
        data.truncate(size)
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    for index, info in list(metadata.storage_data.items()):
        if index.fqn == key:
            metadata.storage_data[index] = dataclasses.replace(
                info, relative_path="__evil_0.distcp", offset=0, length=size
            )
    meta_path.write_bytes(pickle.dumps(metadata))
    return folder
