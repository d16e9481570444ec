"""Recognise a checkpoint's container format from its first bytes, never from its name."""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path

from bnaudit.checkpoint.bytesource import file_size as source_size
from bnaudit.checkpoint.bytesource import is_remote, read_head
from bnaudit.checkpoint.legacy import LEGACY_MAGIC
from bnaudit.checkpoint.remote_folder import folder_kind, index_name, remote_folder_format
from bnaudit.checkpoint.torch_tar import is_torch_tar
from bnaudit.checkpoint.types import ContainerFormat
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load
from bnaudit.checkpoint.zipdir import END_SIGNATURE, LOCAL_SIGNATURE
from bnaudit.errors import BnauditError, InputError

_SNIFF_BYTES = 64 * 1024  # enough to see "weight_map" near the top of a sharded index
_REMOTE_SNIFF_BYTES = 1024  # the least a remote object's first read takes: a torch zip needs no more
_MAX_SAFETENSORS_HEADER = 100_000_000
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\r\x0b\x0c")
_EXPECTED = "expected a torch.save file (.pt/.pth/.bin/.ckpt), a .safetensors file or a sharded *.index.json"


def _is_legacy_torch(head: bytes) -> bool:
    # The first pickle of a legacy file is the magic number alone: a few bytes, cheap to unpickle inertly.
    try:
        first, _, _ = inert_load(io.BytesIO(head), display="", source="magic number")
    except BnauditError:
        return False
    return isinstance(first, int) and first == LEGACY_MAGIC


def _reads_as_old_pickle(path: Path) -> bool:
    """A protocol 0 or 1 pickle (no PROTO opcode): torch.load unpickles any file that is neither a zip nor
    a tar, whatever its protocol, so one that parses (or names a global before it breaks) is a pickle to
    scan, not a text file to refuse. The whole file is read as a stream: a text file breaks within bytes."""
    try:
        with open(path, "rb") as f:
            inert_load(f, display="", source="sniff")
    except CorruptPickleError as exc:
        return bool(exc.globals)
    except BnauditError:
        return False
    return True


def _looks_like_safetensors(head: bytes, file_size: int) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    # A corrupt length still means "safetensors" when the JSON brace is there; the reader reports it. Only
    # rule out lengths that no header could have when they read as text, so that JSON text with '{' at
    # byte 8 (indented JSON) is not mistaken; binary length bytes are a corrupt safetensors header.
    if length <= max(file_size, _MAX_SAFETENSORS_HEADER) * 16:
        return True
    return not all(b in _TEXT_BYTES for b in head[:8])


def sharded_index(folder: Path) -> Path | None:
    """The one ``*.safetensors.index.json`` (else ``*.bin.index.json``) of a Hugging Face folder, or None."""
    name = index_name(sorted(p.name for p in folder.iterdir() if p.is_file()))
    return None if name is None else folder / name


def detect_format(path: str | Path) -> ContainerFormat:
    """Tell which container a checkpoint path is, by content.

    Args:
        path: a file, or a directory (torch.distributed.checkpoint, or a Hugging Face folder with one
            sharded index).

    Returns:
        The ContainerFormat.

    Raises:
        InputError: the path is missing, unreadable, empty, a directory without ``.metadata``, or not a
            format bnaudit knows.
    """
    path = Path(path)
    if is_remote(path):  # a folder behind a URL (remote_folder.py), else an object: its first bytes
        folder = remote_folder_format(path)
        if folder is not None:
            return folder
        size = source_size(path)
        # A zip's first bytes are its pickle, read anyway: 1/4096 of the object (at least 1 KiB) first.
        first = min(max(size >> 12, _REMOTE_SNIFF_BYTES), _SNIFF_BYTES)
        head = read_head(path, first)
        if not head.startswith(LOCAL_SIGNATURE) and len(head) == first < _SNIFF_BYTES:
            head = read_head(path, _SNIFF_BYTES)
        return _format_of(path, head, size)
    try:
        if path.is_dir():
            kind = folder_kind(sorted(p.name for p in path.iterdir() if p.is_file()))
            if kind is not None:
                return kind
            raise InputError(
                "is a directory without a .metadata file, so not a distributed checkpoint",
                path=path,
                fix=_EXPECTED,
            )
        file_size = _regular_file_size(path)
        # O_NONBLOCK: a FIFO swapped in after the check still cannot make the open wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _not_regular(path, os.fstat(f.fileno()).st_mode)
            head = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise InputError("no such file or directory", path=path, fix="check the path") from None
    except PermissionError:
        raise InputError("permission denied", path=path, fix="check the file's permissions") from None
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror})", path=path, fix="check the path") from None
    return _format_of(path, head, file_size)


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def _not_regular(path: Path, mode: int) -> InputError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return InputError(
        f"is {kind}, not a regular file: bnaudit reads checkpoints from files only, so it is not read",
        path=path,
        fix="save the checkpoint to a file and pass that",
    )


def _regular_file_size(path: Path) -> int:
    """The size of a regular file; anything else (FIFO, device, socket) is refused before it is opened,
    since reading a FIFO waits for a writer and a device may never end."""
    mode = path.stat()
    if not stat.S_ISREG(mode.st_mode):
        raise _not_regular(path, mode.st_mode)
    return mode.st_size


def _format_of(path: Path, head: bytes, file_size: int) -> ContainerFormat:
    if not head:
        raise InputError(
            "is empty (0 bytes)", path=path, fix="the save was interrupted — re-save the checkpoint"
        )
    if head.startswith(LOCAL_SIGNATURE):
        return ContainerFormat.TORCH_ZIP
    if head.startswith(END_SIGNATURE):
        raise InputError("is an empty zip archive, not a checkpoint", path=path, fix=_EXPECTED)
    if is_torch_tar(path):  # torch.load tries every file that is not a zip as a tar first, as here
        return ContainerFormat.TORCH_TAR
    if _is_legacy_torch(head):
        return ContainerFormat.TORCH_LEGACY
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return ContainerFormat.PICKLE
    if _looks_like_safetensors(head, file_size):
        return ContainerFormat.SAFETENSORS
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"{"):
        if b'"weight_map"' in head:
            return ContainerFormat.HF_SHARDED
        raise InputError(
            "is a JSON file without a 'weight_map', so not a sharded checkpoint index",
            path=path,
            fix=_EXPECTED,
        )
    if _reads_as_old_pickle(path):
        return ContainerFormat.PICKLE
    kind = "a text file" if _is_text(head) else f"an unknown format (first bytes {head[:8].hex()})"
    raise InputError(f"is {kind}, not a checkpoint", path=path, fix=_EXPECTED)


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
