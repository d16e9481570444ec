"""Reader for legacy torch checkpoints (before 1.6, or ``_use_new_zipfile_serialization=False``)."""

from __future__ import annotations

import struct
from io import BufferedReader
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.types import ITEMSIZE, Checkpoint, ContainerFormat, StorageRef
from bnaudit.checkpoint.unpickler import inert_load
from bnaudit.checkpoint.unpickler_globals import summary
from bnaudit.errors import InputError, UnsupportedFormatError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_COUNT = struct.Struct("<q")  # each storage's data is preceded by its element count


def _check_preamble(path: Path, f: BufferedReader) -> None:
    magic, _, _ = inert_load(f, display=str(path), source="magic number pickle")
    if magic != LEGACY_MAGIC:
        raise InputError(
            "is a pickle but does not start with the torch magic number",
            path=path,
            fix="it is not a legacy torch.save file — pass a torch.save checkpoint",
        )
    protocol, _, _ = inert_load(f, display=str(path), source="protocol version pickle")
    if protocol != LEGACY_PROTOCOL:
        raise UnsupportedFormatError(
            f"legacy torch protocol version {summary(protocol)} is not supported "
            f"(expected {LEGACY_PROTOCOL})",
            path=path,
            fix="load and re-save it with a recent torch",
        )
    sys_info, _, _ = inert_load(f, display=str(path), source="sys_info pickle")
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise UnsupportedFormatError(
            "was saved on a big-endian machine",
            path=path,
            fix=(
                "bnaudit reads little-endian "
                "checkpoints only — load and re-save it on a little-endian machine"
            ),
        )


def _element_sizes(path: Path, f: BufferedReader) -> dict[str, int]:
    """First pass over the main pickle: the element size of every storage it refers to."""
    sizes: dict[str, int] = {}

    def collect(key: str, dtype: str, expected_nbytes: int) -> StorageRef:
        sizes[key] = ITEMSIZE[dtype]
        return StorageRef(path, key, 0, expected_nbytes, dtype)

    inert_load(f, display=str(path), source="main pickle", resolver=collect)
    return sizes


def _storage_keys(path: Path, f: BufferedReader) -> list[str]:
    keys: Any
    keys, _, _ = inert_load(f, display=str(path), source="storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise InputError(
            f"the storage key list is not a list of strings (found {type(keys).__name__})",
            path=path,
            fix="the file is corrupt — re-save it",
        )
    return keys


def _locate_storages(
    path: Path, f: BufferedReader, keys: list[str], sizes: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """Key -> (absolute data offset, nbytes), found by seeking over the data, never reading it."""
    file_size = path.stat().st_size
    located: dict[str, tuple[int, int]] = {}
    pos = f.tell()
    for key in keys:
        if key not in sizes:
            raise InputError(
                f"storage '{key}' is listed but no tensor refers to it, so its size is unknown",
                path=path,
                fix="the file is corrupt — re-save it",
            )
        f.seek(pos)
        header = f.read(_COUNT.size)
        count = _COUNT.unpack(header)[0] if len(header) == _COUNT.size else -1
        nbytes = count * sizes[key]
        if count < 0 or pos + _COUNT.size + nbytes > file_size:
            raise InputError(
                f"storage '{key}' at byte {pos} runs past the end of the file ({file_size} bytes)",
                path=path,
                fix="the file is truncated — re-save it or copy it again",
            )
        located[key] = (pos + _COUNT.size, nbytes)
        pos += _COUNT.size + nbytes
    return located


def read_legacy(path: Path) -> Checkpoint:
    """Read a legacy (pre-zip) ``torch.save`` file without executing it or reading its storages.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``torch-legacy``); ``state_dicts`` is left empty for ``load_checkpoint``.

    Raises:
        UnsupportedFormatError: an unknown legacy protocol or a big-endian file.
        InputError: the file is truncated or corrupt, or a storage is missing.
    """
    with open(path, "rb") as f:
        _check_preamble(path, f)
        main_start = f.tell()
        sizes = _element_sizes(path, f)
        keys = _storage_keys(path, f)
        located = _locate_storages(path, f, keys, sizes)

        def resolve(key: str, dtype: str, expected_nbytes: int) -> StorageRef:
            if key not in located:
                raise InputError(
                    f"the pickle refers to storage '{key}' which is not in the file's storage list",
                    path=path,
                    fix="the file is corrupt — re-save it",
                )
            offset, nbytes = located[key]
            return StorageRef(path, key, offset, nbytes, dtype)

        # Second pass: the storages' offsets are known only after the main pickle, so it is read again.
        f.seek(main_start)
        root, refs, warnings = inert_load(f, display=str(path), source="main pickle", resolver=resolve)
    return Checkpoint(path, ContainerFormat.TORCH_LEGACY, root, globals=refs, warnings=warnings)
