"""Checkpoint reading: format detection, inert loading, lazy tensors and state dict discovery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bnaudit.checkpoint.detect import detect_format
from bnaudit.checkpoint.discover import find_state_dicts, select_state_dicts
from bnaudit.checkpoint.legacy import read_legacy
from bnaudit.checkpoint.safetensors_io import read_safetensors
from bnaudit.checkpoint.sharded import read_sharded
from bnaudit.checkpoint.tensors import DtypeOverflowError, encode_like, read_tensor
from bnaudit.checkpoint.torchzip import read_torch_zip
from bnaudit.checkpoint.types import (
    Checkpoint,
    GlobalRef,
    Placeholder,
    StateDictRef,
    StorageRef,
    TensorRef,
    iter_tensors,
)
from bnaudit.checkpoint.unpickler import MAX_PICKLE_BYTES, inert_load
from bnaudit.errors import BnauditError, InputError

__all__ = [
    "Checkpoint",
    "DtypeOverflowError",
    "GlobalRef",
    "Placeholder",
    "StateDictRef",
    "StorageRef",
    "TensorRef",
    "detect_format",
    "encode_like",
    "find_state_dicts",
    "iter_tensors",
    "load_checkpoint",
    "read_tensor",
    "select_state_dicts",
]


def _read_pickle(path: Path) -> Checkpoint:
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise InputError(
            f"{path}: is a {size} byte pickle, over the {MAX_PICKLE_BYTES} byte limit; "
            "save a state dict with torch.save instead"
        )
    with open(path, "rb") as f:
        root, refs, warnings = inert_load(f, display=str(path), source=path.name)
    return Checkpoint(path=path, format="pickle", root=root, state_dicts=[], globals=refs, warnings=warnings)


def _read_dcp(path: Path) -> Checkpoint:
    # Imported on use: the DCP reader is the largest reader module, and most runs read files, not folders.
    from bnaudit.checkpoint.dcp import read_dcp

    return read_dcp(path)


# One entry per container format: adding a format is adding a reader here.
_READERS: dict[str, Callable[[Path], Checkpoint]] = {
    "torch-zip": read_torch_zip,
    "torch-legacy": read_legacy,
    "pickle": _read_pickle,
    "safetensors": read_safetensors,
    "hf-sharded": read_sharded,
    "dcp": _read_dcp,
}


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint of any supported format without executing it or reading its tensor data.

    Args:
        path: a ``torch.save`` file (zip or legacy), a plain pickle, a ``.safetensors`` file, a Hugging Face
            ``*.index.json``, or a torch.distributed.checkpoint folder.

    Returns:
        The Checkpoint with its state dicts found (tensors stay lazy: call ``TensorRef.to_numpy``).

    Raises:
        UnsupportedFormatError: a recognised container bnaudit does not read (TorchScript).
        InputError: the path is missing, unreadable, empty, truncated, corrupt or of an unknown format.
    """
    path = Path(path)
    fmt = detect_format(path)
    try:
        ckpt = _READERS[fmt](path)
    except BnauditError:
        raise
    except OSError as exc:
        raise InputError(
            f"{path}: cannot be read ({exc.strerror or exc}); check the file and its permissions"
        ) from None
    ckpt.state_dicts = find_state_dicts(ckpt.root, str(path))
    return ckpt
