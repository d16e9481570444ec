"""Reader for plain pickles: rebuilt inertly; the torch storages they name are not in the file."""

from __future__ import annotations

from pathlib import Path

from bnaudit.checkpoint.types import Checkpoint, ContainerFormat
from bnaudit.checkpoint.unpickler import MAX_PICKLE_BYTES, inert_load
from bnaudit.errors import InputError


def read_pickle(path: Path) -> Checkpoint:
    """Read a plain pickle without executing it.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``pickle``); ``state_dicts`` is left empty for ``load_checkpoint``.

    Raises:
        InputError: the pickle is over the size limit, corrupt or truncated.
    """
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise InputError(
            f"is a {size} byte pickle, over the {MAX_PICKLE_BYTES} byte limit",
            path=path,
            fix="save a state dict with torch.save instead",
        )
    with open(path, "rb") as f:
        root, refs, warnings = inert_load(f, display=str(path), source=path.name)
    return Checkpoint(
        path=path, format=ContainerFormat.PICKLE, root=root, state_dicts=[], globals=refs, warnings=warnings
    )
