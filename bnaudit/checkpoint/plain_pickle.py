"""Reader for plain pickles: rebuilt inertly; the torch storages they name are not in the file."""

from __future__ import annotations

from pathlib import Path

from bnaudit.checkpoint.types import Checkpoint, ContainerFormat
from bnaudit.checkpoint.unpickler import inert_load_file


def read_pickle(path: Path) -> Checkpoint:
    """Read a plain pickle without executing it.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``pickle``); ``state_dicts`` is left empty for ``load_checkpoint``.

    Raises:
        InputError: the pickle is over the size limit, corrupt or truncated.
    """
    root, refs, warnings = inert_load_file(path, where=None, fix="save a state dict with torch.save instead")
    return Checkpoint(
        path=path, format=ContainerFormat.PICKLE, root=root, state_dicts=[], globals=refs, warnings=warnings
    )
