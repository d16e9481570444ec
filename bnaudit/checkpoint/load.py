"""Open a checkpoint of any format: detect it, read it through the registry, find its state dicts."""

from __future__ import annotations

from pathlib import Path

from bnaudit.checkpoint.detect import detect_format
from bnaudit.checkpoint.discover import find_state_dicts
from bnaudit.checkpoint.formats import format_spec
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.errors import BnauditError, InputError


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint of any supported format without executing it or reading its tensor data.

    Args:
        path: a ``torch.save`` file (zip or legacy), a plain pickle, a ``.safetensors`` file, a Hugging Face
            ``*.index.json``, or a torch.distributed.checkpoint folder.

    Returns:
        The Checkpoint with its state dicts found (tensors stay lazy: read them with
        :func:`bnaudit.checkpoint.tensors.read_tensor`).

    Raises:
        UnsupportedFormatError: a recognised container bnaudit does not read (TorchScript).
        InputError: the path is missing, unreadable, empty, truncated, corrupt or of an unknown format.
    """
    path = Path(path)
    spec = format_spec(detect_format(path))
    try:
        ckpt = spec.reader(path)
    except BnauditError:
        raise
    except OSError as exc:
        raise InputError(
            f"cannot be read ({exc.strerror or exc})", path=path, fix="check the file and its permissions"
        ) from None
    ckpt.state_dicts = find_state_dicts(ckpt.root, str(path))
    return ckpt
