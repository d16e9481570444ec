"""Reader for legacy torch checkpoints (before 1.6, or ``_use_new_zipfile_serialization=False``)."""

from __future__ import annotations

import struct
from io import BufferedReader
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.types import ITEMSIZE, Checkpoint, ContainerFormat, GlobalRef, StorageRef
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load
from bnaudit.checkpoint.unpickler_globals import StorageResolver, summary
from bnaudit.errors import InputError, UnsupportedFormatError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_COUNT = struct.Struct("<q")  # each storage's data is preceded by its element count


class _Pickles:
    """Every pickle torch.load unpickles from a legacy file, read in its order: the magic number, the
    protocol version, the sys_info, the main pickle and the storage key list. Each may carry a payload that
    runs under torch.load, so the globals of all of them are kept, and an error raised once some were read
    carries them (:class:`CorruptPickleError`), so that a dangerous one is still reported."""

    def __init__(self, path: Path, f: BufferedReader) -> None:
        self.path, self.f = path, f
        self.globals: list[GlobalRef] = []
        self.warnings: list[str] = []

    def load(self, source: str, resolver: StorageResolver | None = None, keep: bool = True) -> Any:
        try:
            obj, refs, warnings = inert_load(self.f, display=str(self.path), source=source, resolver=resolver)
        except CorruptPickleError as exc:
            exc.globals = (*self.globals, *exc.globals)
            raise
        if keep:
            self.globals.extend(r for r in refs if r not in self.globals)
            self.warnings.extend(warnings)
        return obj

    def fail(self, error: InputError) -> InputError:
        """``error``, as a CorruptPickleError carrying the globals read so far when there are any."""
        if not self.globals:
            return error
        f = error.fields
        carried = CorruptPickleError(
            f.problem, path=f.path, where=f.where, expected=f.expected, found=f.found, fix=f.fix
        )
        carried.globals = tuple(self.globals)
        return carried


def _check_preamble(pickles: _Pickles) -> None:
    path = pickles.path
    magic = pickles.load("magic number pickle")
    if magic != LEGACY_MAGIC:
        raise pickles.fail(InputError(
            "is a pickle but does not start with the torch magic number",
            path=path,
            fix="it is not a legacy torch.save file — pass a torch.save checkpoint",
        ))  # fmt: skip
    protocol = pickles.load("protocol version pickle")
    if protocol != LEGACY_PROTOCOL:
        raise pickles.fail(UnsupportedFormatError(
            f"legacy torch protocol version {summary(protocol)} is not supported "
            f"(expected {LEGACY_PROTOCOL})",
            path=path,
            fix="load and re-save it with a recent torch",
        ))  # fmt: skip
    sys_info = pickles.load("sys_info pickle")
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise pickles.fail(UnsupportedFormatError(
            "was saved on a big-endian machine",
            path=path,
            fix=(
                "bnaudit reads little-endian "
                "checkpoints only — load and re-save it on a little-endian machine"
            ),
        ))  # fmt: skip


def _element_sizes(pickles: _Pickles) -> dict[str, int]:
    """First pass over the main pickle: the element size of every storage it refers to."""
    sizes: dict[str, int] = {}

    def collect(key: str, dtype: str, expected_nbytes: int) -> StorageRef:
        sizes[key] = ITEMSIZE[dtype]
        return StorageRef(pickles.path, key, 0, expected_nbytes, dtype)

    pickles.load("main pickle", resolver=collect, keep=False)
    return sizes


def _storage_keys(pickles: _Pickles) -> list[str]:
    keys: Any = pickles.load("storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise pickles.fail(InputError(
            f"the storage key list is not a list of strings (found {type(keys).__name__})",
            path=pickles.path,
            fix="the file is corrupt — re-save it",
        ))  # fmt: skip
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
        pickles = _Pickles(path, f)
        _check_preamble(pickles)
        main_start = f.tell()
        sizes = _element_sizes(pickles)
        keys = _storage_keys(pickles)
        try:
            located = _locate_storages(path, f, keys, sizes)
        except InputError as exc:
            raise pickles.fail(exc) from None

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
        root = pickles.load("main pickle", resolver=resolve)
    return Checkpoint(
        path, ContainerFormat.TORCH_LEGACY, root, globals=pickles.globals, warnings=pickles.warnings
    )
