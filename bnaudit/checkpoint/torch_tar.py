"""Reader for the pre-1.0 tar checkpoints, scanned as torch.load reads them.

torch.load tries every file that is not a zip as a tar archive first (Python's ``tarfile``, the module
used here too, so both see the same members), and reads three members, each holding pickles:

- ``storages``: a count, then per storage a pickle ``(key, location, storage class)`` followed by the
  storage's element count (8 bytes) and data, then a pickle of the storage views;
- ``tensors``: a count, then per tensor a pickle ``(key, storage key, tensor class)`` followed by its
  dimensions, sizes, strides and offset;
- ``pickle``: the object, whose persistent ids name those tensors.

Every one of those pickles runs under torch.load, so each is scanned for its globals. The tensors
themselves are not read (the format predates torch 1.0): they stay placeholders.
"""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path
from typing import IO, Any

from bnaudit.checkpoint.types import ITEMSIZE, Checkpoint, ContainerFormat, GlobalRef
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load
from bnaudit.checkpoint.unpickler_globals import StorageType
from bnaudit.errors import InputError

_COUNT = struct.Struct("<q")
_TENSOR_HEAD = struct.Struct("<i4x")  # ndim, then 4 bytes that older torch counted in ndim
_FIX = "re-save it with a recent torch (torch.save writes a zip since 1.6)"


def is_torch_tar(path: Path) -> bool:
    """Whether torch.load would read ``path`` as a tar checkpoint: Python's tarfile opens it."""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:", format=tarfile.PAX_FORMAT):
            return True
    except (tarfile.TarError, OSError, ValueError):
        return False


class _Scan:
    """The pickles read so far; an error raised after some carries their globals (CorruptPickleError)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.globals: list[GlobalRef] = []
        self.warnings: list[str] = []

    def load(self, f: IO[bytes], source: str) -> Any:
        try:
            obj, refs, warnings = inert_load(f, display=str(self.path), source=source)  # type: ignore[arg-type]
        except CorruptPickleError as exc:
            exc.globals = (*self.globals, *exc.globals)
            raise
        self.globals.extend(r for r in refs if r not in self.globals)
        self.warnings.extend(w for w in warnings if w not in self.warnings)
        return obj

    def fail(self, problem: str, where: str) -> CorruptPickleError:
        error = CorruptPickleError(problem, path=self.path, where=where, fix=_FIX)
        error.globals = tuple(self.globals)
        return error


def _count(scan: _Scan, f: IO[bytes], member: str, what: str) -> int:
    count = scan.load(f, f"{member} ({what} count)")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise scan.fail(f"the {what} count is not a count (found {type(count).__name__})", member)
    return count


def _skip(scan: _Scan, f: IO[bytes], size: int, member: str, what: str) -> None:
    if size < 0 or len(f.read(size)) != size:
        raise scan.fail(f"{what} runs past the end of the member", member)


def _storages(scan: _Scan, f: IO[bytes]) -> None:
    for index in range(_count(scan, f, "storages", "storage")):
        args = scan.load(f, f"storages (storage {index})")
        stype = args[2] if isinstance(args, tuple) and len(args) == 3 else None
        if not isinstance(stype, StorageType):
            # torch.load stops here too (no storage class to size the data by): nothing after it runs.
            raise scan.fail(f"storage {index} names no storage class", "storages")
        raw = f.read(_COUNT.size)
        elements = _COUNT.unpack(raw)[0] if len(raw) == _COUNT.size else -1
        _skip(scan, f, elements * ITEMSIZE[stype.dtype], "storages", f"storage {index}")
    scan.load(f, "storages (storage views)")


def _tensors(scan: _Scan, f: IO[bytes]) -> None:
    for index in range(_count(scan, f, "tensors", "tensor")):
        scan.load(f, f"tensors (tensor {index})")
        raw = f.read(_TENSOR_HEAD.size)
        ndim = _TENSOR_HEAD.unpack(raw)[0] if len(raw) == _TENSOR_HEAD.size else -1
        _skip(scan, f, 16 * ndim + 8, "tensors", f"tensor {index}")


def _member(scan: _Scan, tar: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        info = tar.getmember(name)  # the last member of that name, as tar.extract and torch.load take it
    except KeyError:
        raise scan.fail(
            f"is a tar archive without a '{name}' member, so not a torch checkpoint", name
        ) from None
    stream = tar.extractfile(info) if info.isfile() else None
    if stream is None:
        # A link would make torch.load read another file as this member: nothing bnaudit can scan.
        raise scan.fail(f"member '{name}' is not a regular file (a link or device)", name)
    return stream


def read_torch_tar(path: Path) -> Checkpoint:
    """Scan a pre-1.0 tar checkpoint's pickles in torch.load's order without executing any.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``torch-tar``) whose root is the main pickle's object, tensors as placeholders.

    Raises:
        CorruptPickleError: a member is missing, not a file, or breaks off (carrying the globals seen).
        InputError: the tar archive itself is unreadable.
    """
    scan = _Scan(path)
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:", format=tarfile.PAX_FORMAT) as tar:
            _storages(scan, _member(scan, tar, "storages"))
            _tensors(scan, _member(scan, tar, "tensors"))
            root = scan.load(_member(scan, tar, "pickle"), "pickle")
    except tarfile.TarError as exc:
        raise InputError(f"is an unreadable tar archive ({exc})", path=path, fix=_FIX) from None
    scan.warnings.append("a pre-1.0 tar checkpoint: its tensors are not read, only its pickles scanned")
    return Checkpoint(path, ContainerFormat.TORCH_TAR, root, globals=scan.globals, warnings=scan.warnings)
