"""A tiny pickle assembler: each helper returns the opcodes that push one object on the unpickler's stack.

The corpus writes its payloads opcode by opcode, as an attacker does, so a case can use exactly the opcode
(GLOBAL or STACK_GLOBAL, REDUCE, INST, OBJ, NEWOBJ_EX, BUILD, EXT1, a persistent id) its class is about.
"""

from __future__ import annotations

import struct

MARK, TUPLE, REDUCE, BUILD, POP, STOP = b"(", b"t", b"R", b"b", b"0", b"."
NONE, TRUE, FALSE, EMPTY_DICT, EMPTY_LIST = b"N", b"\x88", b"\x89", b"}", b"]"
SETITEMS, APPENDS, NEWOBJ_EX, STACK_GLOBAL, BINPERSID = b"u", b"e", b"\x92", b"\x93", b"Q"


def proto(n: int) -> bytes:
    return b"\x80" + bytes([n])


def text(value: str) -> bytes:
    """BINUNICODE: a str."""
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def raw_bytes(value: bytes) -> bytes:
    """BINBYTES: a bytes object (protocol 3+)."""
    return b"B" + struct.pack("<I", len(value)) + value


def integer(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def glob(module: str, name: str) -> bytes:
    """GLOBAL: the protocol-0 form, ``module\\nname\\n``."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL: under protocol 4+ the unpickler walks a dotted ``name`` attribute by attribute."""
    return text(module) + text(name) + STACK_GLOBAL


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def lst(*items: bytes) -> bytes:
    return EMPTY_LIST + (MARK + b"".join(items) + APPENDS if items else b"")


def dct(**items: bytes) -> bytes:
    body = b"".join(text(k) + v for k, v in items.items())
    return EMPTY_DICT + (MARK + body + SETITEMS if items else b"")


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` through REDUCE; ``func`` is any opcodes that push a callable."""
    return func + tup(*args) + REDUCE


def whole(payload: bytes, protocol: int = 4) -> bytes:
    """A complete pickle whose only object is ``payload``."""
    return proto(protocol) + payload + STOP


def touch_command(marker: str) -> str:
    return f"touch {marker}"


def touch_source(marker: str) -> str:
    """Python source that creates the marker and nothing else."""
    return f"open({marker!r}, 'w').close()"


def system_call(marker: str, func: bytes | None = None) -> bytes:
    """``os.system('touch MARKER')``; ``func`` replaces how ``os.system`` is reached."""
    return call(func if func is not None else glob("os", "system"), text(touch_command(marker)))
