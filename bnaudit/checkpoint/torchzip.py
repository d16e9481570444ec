"""Reader for torch zip checkpoints (``torch.save`` since PyTorch 1.6)."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from bnaudit.checkpoint.types import Checkpoint, StorageRef
from bnaudit.checkpoint.unpickler import MAX_PICKLE_BYTES, StorageResolver, inert_load
from bnaudit.errors import InputError, UnsupportedFormatError

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version..sizes skipped), name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
# What zipfile raises on a corrupt entry: unsupported "compression methods" or zip versions
# (NotImplementedError) and the encryption flag (RuntimeError) come from flipped bits, not real archives.
ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
)


class ZipEntry(NamedTuple):
    """Where one zip entry's data lies in the file (a tuple: archives hold thousands of entries)."""

    name: str
    header_offset: int
    data_offset: int
    stored_size: int  # bytes in the file (compressed size)
    size: int  # bytes once decompressed
    compressed: bool


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        ValueError,
        struct.error,
        NotImplementedError,
    ) as exc:
        raise InputError(
            f"{path}: is not a complete zip archive ({exc}); the file is truncated or corrupt — "
            "re-save it or copy it again"
        ) from None


def _check_torchscript(path: Path, names: list[str]) -> None:
    for name in names:
        parts = name.split("/")
        if parts[-1] == "constants.pkl" or (len(parts) > 2 and parts[1] == "code"):
            raise UnsupportedFormatError(
                f"{path}: is a TorchScript archive (torch.jit.save); bnaudit reads state dicts, not scripted "
                "modules: save model.state_dict() with torch.save and audit that"
            )


def archive_prefix(path: Path, names: list[str]) -> str:
    """The folder every entry of a torch zip lives in (``archive/``, or the file stem for older torch).

    Args:
        path: the file, for messages.
        names: the zip's entry names.

    Returns:
        The prefix including its trailing ``/``.

    Raises:
        UnsupportedFormatError: the zip is a TorchScript archive.
        InputError: the zip holds no ``<name>/data.pkl``, or several.
    """
    _check_torchscript(path, names)
    candidates = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(f"'{c}data.pkl'" for c in candidates)
        raise InputError(
            f"{path}: is a zip archive but not a torch.save checkpoint: expected one '<name>/data.pkl' "
            f"entry, found {found}; pass a file written by torch.save"
        )
    return candidates[0]


def read_entries(path: Path, zf: zipfile.ZipFile, file_size: int, base: int = 0) -> dict[str, ZipEntry]:
    """Locate every entry's data in the file and check that no two overlap.

    Args:
        path: the zip file.
        zf: the open archive.
        file_size: the file's size in bytes (for an embedded archive: where the archive ends).
        base: absolute offset of the archive's first byte in ``path`` (non-zero for the archives DCP embeds
            in its ``.distcp`` files); ZipEntry offsets are absolute.

    Returns:
        Entry name -> ZipEntry.

    Raises:
        InputError: a local header is missing or corrupt, or entries overlap or run past the end of the file.
    """
    entries: dict[str, ZipEntry] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        # One pread of the 30 fixed bytes per header: a buffered file would read 8 KB at every seek.
        for info in zf.infolist():
            header = os.pread(fd, _LOCAL_HEADER.size, base + info.header_offset)
            if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
                raise InputError(
                    f"{path}: zip entry '{info.filename}' has no local header at offset "
                    f"{info.header_offset}; the file is truncated or corrupt — re-save it"
                )
            _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            data_offset = base + info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            entries[info.filename] = ZipEntry(
                info.filename,
                base + info.header_offset,
                data_offset,
                info.compress_size,
                info.file_size,
                info.compress_type != zipfile.ZIP_STORED,
            )
    finally:
        os.close(fd)
    _check_layout(path, sorted(entries.values(), key=lambda e: e.header_offset), file_size)
    return entries


def _check_layout(path: Path, ordered: list[ZipEntry], file_size: int) -> None:
    for entry, following in zip(ordered, [*ordered[1:], None], strict=True):
        end = entry.data_offset + entry.stored_size
        if end > file_size:
            raise InputError(
                f"{path}: zip entry '{entry.name}' ends at byte {end} but the file has {file_size} bytes; "
                "the file is truncated — re-save it or copy it again"
            )
        if following is not None and following.header_offset < end:
            raise InputError(
                f"{path}: zip entries '{entry.name}' and '{following.name}' overlap; the file is corrupt "
                "or crafted — re-save it"
            )


def _storage_resolver(path: Path, prefix: str, entries: dict[str, ZipEntry]) -> StorageResolver:
    def resolve(key: str, dtype: str, expected_nbytes: int) -> StorageRef:
        name = f"{prefix}data/{key}"
        entry = entries.get(name)
        if entry is None:
            raise InputError(
                f"{path}: the pickle refers to storage '{key}' but zip entry '{name}' is missing; "
                "the file is truncated or corrupt — re-save it"
            )
        # nbytes is what the file really holds; a short entry is reported when a tensor is read.
        return StorageRef(path, name, entry.data_offset, entry.size, dtype, compressed=entry.compressed)

    return resolve


def read_torch_zip(path: Path) -> Checkpoint:
    """Read a ``torch.save`` zip checkpoint without executing its pickle or reading its storages.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``torch-zip``) whose root holds lazy TensorRefs; ``state_dicts`` is left empty
        for :func:`bnaudit.checkpoint.load_checkpoint` to fill.

    Raises:
        UnsupportedFormatError: the file is a TorchScript archive or a big-endian checkpoint.
        InputError: the archive is truncated or corrupt, or the pickle refers to a missing storage.
    """
    file_size = path.stat().st_size
    with _open_zip(path) as zf:
        names = zf.namelist()
        prefix = archive_prefix(path, names)
        entries = read_entries(path, zf, file_size)
        _check_byteorder(path, zf, prefix, names)
        pkl = entries[prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise InputError(
                f"{path}: '{pkl.name}' is {pkl.size} bytes, over the {MAX_PICKLE_BYTES} byte limit "
                "for a checkpoint pickle; save a state dict instead"
            )
        data = _read_entry(path, zf, pkl.name)
    root, refs, warnings = inert_load(
        data, display=str(path), source=pkl.name, resolver=_storage_resolver(path, prefix, entries)
    )
    return Checkpoint(
        path=path, format="torch-zip", root=root, state_dicts=[], globals=refs, warnings=warnings
    )


def _read_entry(path: Path, zf: zipfile.ZipFile, name: str) -> bytes:
    try:
        return zf.read(name)
    except ZIP_READ_ERRORS as exc:
        raise InputError(
            f"{path}: cannot read zip entry '{name}' ({exc}); the file is corrupt — re-save it"
        ) from None


def _check_byteorder(path: Path, zf: zipfile.ZipFile, prefix: str, names: list[str]) -> None:
    name = prefix + "byteorder"
    if name in names and _read_entry(path, zf, name).strip() not in (b"", b"little"):
        raise UnsupportedFormatError(
            f"{path}: was saved on a big-endian machine ('{name}' says big); bnaudit reads little-endian "
            "checkpoints only — load and re-save it on a little-endian machine"
        )
