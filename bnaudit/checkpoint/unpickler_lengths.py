"""Length-prefixed pickle opcodes, checked against the size of the whole pickle before anything is allocated.

The pure-Python unpickler trusts a declared length: ``BYTEARRAY8`` with a length of 4 GiB in a 12-byte pickle
makes it allocate and zero 4 GiB before it finds the data missing, and ``BINBYTES8``/``BINUNICODE8``/
``FRAME`` ask the file for that many bytes at once. No argument can be longer than the pickle holding it,
so a length over the pickle's size is refused as corrupt before any allocation. (The C unpickler is only
given pickles whose lengths :mod:`bnaudit.checkpoint.pickle_scan` has checked against what remains.)
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from typing import Any


def input_size(data: Any) -> int | None:
    """The most bytes a pickle stream can hold: a BytesIO's buffer or a file's size (None: unknown)."""
    if isinstance(data, io.BytesIO):
        return data.getbuffer().nbytes
    try:
        return os.fstat(data.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _claimed(unpickler: Any, width: int) -> int:
    raw = unpickler.read(width)
    if len(raw) != width:
        raise EOFError("pickle ends inside a length")
    length = int.from_bytes(raw, "little")
    if unpickler.input_size is not None and length > unpickler.input_size:
        raise pickle.UnpicklingError(
            f"an argument claims {length} bytes, more than the {unpickler.input_size} bytes of the input"
        )
    return length


def _exact(unpickler: Any, width: int) -> bytes:
    length = _claimed(unpickler, width)
    data: bytes = unpickler.read(length)
    if len(data) != length:
        raise EOFError(f"pickle ends inside a {length}-byte argument")
    return data


def _bytes(width: int) -> Callable[[Any], None]:
    def load(unpickler: Any) -> None:
        unpickler.append(_exact(unpickler, width))

    return load


def _unicode(width: int) -> Callable[[Any], None]:
    def load(unpickler: Any) -> None:
        unpickler.append(str(_exact(unpickler, width), "utf-8", "surrogatepass"))

    return load


def _bytearray8(unpickler: Any) -> None:
    unpickler.append(bytearray(_exact(unpickler, 8)))


def _frame(unpickler: Any) -> None:
    unpickler._unframer.load_frame(_claimed(unpickler, 8))


def checked_dispatch(dispatch: dict[int, Callable[..., Any]]) -> dict[int, Callable[..., Any]]:
    """``dispatch`` (a pure-Python unpickler's opcode table) with its unsigned length opcodes checked.

    BINSTRING and LONG4 keep the originals: their lengths are signed, and the originals read them as such.
    """
    checked: dict[bytes, Callable[[Any], None]] = {
        pickle.BINBYTES: _bytes(4),
        pickle.BINBYTES8: _bytes(8),
        pickle.BINUNICODE: _unicode(4),
        pickle.BINUNICODE8: _unicode(8),
        pickle.BYTEARRAY8: _bytearray8,
        pickle.FRAME: _frame,
    }
    return {**dispatch, **{op[0]: load for op, load in checked.items()}}
