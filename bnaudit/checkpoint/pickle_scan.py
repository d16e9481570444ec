"""A pre-scan of a pickle's opcodes that decides whether the C unpickler may run on it.

CPython's C unpickler is about twice as fast as the pure-Python one on a checkpoint pickle, but it keeps its
memo in an array sized by the largest memo index it is asked to store: ``LONG_BINPUT 0xFFFFFFF0`` in a
60-byte pickle makes it allocate and zero tens of gigabytes. Picklers number memo entries 0, 1, 2...,
so a real pickle never stores an index above the number of entries stored before it. This scan walks the
opcodes (no objects are built) and accepts a pickle only when

- every memo index it stores is at most the number of memo stores before it,
- every length-prefixed argument and frame fits in the bytes that remain,
- every opcode is known and the pickle ends with STOP.

Anything else is left to the pure-Python unpickler (whose memo is a dict), which also words the errors.
"""

from __future__ import annotations

import threading

# Opcode byte -> how its argument is laid out (opcodes of protocols 0-5, as listed in pickletools):
# n >= 0: n fixed bytes; -1/-4/-8: data preceded by its length in 1/4/8 little-endian bytes;
# _ONE_LINE/_TWO_LINES: newline-terminated text; None: not an opcode.
_ONE_LINE, _TWO_LINES = -10, -20
_ARGUMENT: list[int | None] = [None] * 256
for _ops, _layout in (
    (b"(.012N\x88\x89]aelt)\x85\x86\x87}dsu\x8f\x90\x91\x93\x94RboQ\x81\x92\x97\x98", 0),
    (b"Khq\x80\x82", 1),  # BININT1 BINGET BINPUT PROTO EXT1
    (b"M\x83", 2),  # BININT2 EXT2
    (b"Jjr\x84", 4),  # BININT LONG_BINGET LONG_BINPUT EXT4
    (b"G\x95", 8),  # BINFLOAT FRAME
    (b"UC\x8c\x8a", -1),  # SHORT_BINSTRING SHORT_BINBYTES SHORT_BINUNICODE LONG1
    (b"TBX\x8b", -4),  # BINSTRING BINBYTES BINUNICODE LONG4
    (b"\x8d\x8e\x96", -8),  # BINUNICODE8 BINBYTES8 BYTEARRAY8
    (b"ILFSVPgp", _ONE_LINE),  # INT LONG FLOAT STRING UNICODE PERSID GET PUT
    (b"ci", _TWO_LINES),  # GLOBAL INST
):
    for _op in _ops:
        _ARGUMENT[_op] = _layout

_STOP, _BINPUT, _LONG_BINPUT, _MEMOIZE, _PUT, _FRAME = 0x2E, 0x71, 0x72, 0x94, 0x70, 0x95
_CHECKED = frozenset({_STOP, _BINPUT, _LONG_BINPUT, _MEMOIZE, _FRAME})  # fixed-argument opcodes to look at


# The ranks of one job save the same pickle byte for byte (same keys, shapes and storage names), so the
# verdicts on the last few pickles are kept: a lookup hashes and compares bytes, far cheaper than a scan.
_VERDICTS: dict[bytes, bool] = {}
_VERDICTS_KEPT = 8
_VERDICT_MAX_BYTES = 1 << 20  # larger pickles are scanned every time rather than kept in memory
_VERDICTS_LOCK = threading.Lock()  # compare --jobs reads ranks in threads


def c_unpickler_safe(data: bytes) -> bool:
    """Whether the C unpickler can run on ``data`` without an outsized memo or argument allocation.

    Args:
        data: a whole pickle (bytes after its STOP opcode are ignored, as the unpickler ignores them).

    Returns:
        True when the pickle passes every check in the module docstring; False sends it to the
        pure-Python unpickler.
    """
    if len(data) > _VERDICT_MAX_BYTES:
        return _scan(data)
    with _VERDICTS_LOCK:
        verdict = _VERDICTS.get(data)
    if verdict is None:
        verdict = _scan(data)
        with _VERDICTS_LOCK:
            if len(_VERDICTS) >= _VERDICTS_KEPT:
                del _VERDICTS[next(iter(_VERDICTS))]  # the oldest
            _VERDICTS[data] = verdict
    return verdict


def _scan(data: bytes) -> bool:
    argument, checked = _ARGUMENT, _CHECKED  # locals: this loop runs once per opcode
    end, pos, stores = len(data), 0, 0
    while pos < end:
        op = data[pos]
        layout = argument[op]
        if layout is None:
            return False
        if layout >= 0:
            if op in checked:
                if op == _LONG_BINPUT:
                    if int.from_bytes(data[pos + 1 : pos + 5], "little") > stores:
                        return False
                    stores += 1
                elif op == _STOP:
                    return True
                elif op == _FRAME:
                    if int.from_bytes(data[pos + 1 : pos + 9], "little") > end - pos - 9:
                        return False
                else:  # BINPUT (a one-byte index sizes the memo to 510 at most) or MEMOIZE
                    stores += 1
            pos += 1 + layout
        elif layout > _ONE_LINE:
            # The length is read unsigned even where the opcode's is signed: a negative length then looks
            # huge and is refused, and the position only ever moves forward.
            pos += 1 - layout + int.from_bytes(data[pos + 1 : pos + 1 - layout], "little")
            if pos > end:
                return False
        else:
            pos += 1
            for _ in range(layout // _ONE_LINE):
                newline = data.find(b"\n", pos)
                if newline < 0:
                    return False
                if op == _PUT:
                    text = data[pos:newline]
                    if not text.isdigit() or len(text) > 12 or int(text) > stores:
                        return False
                    stores += 1
                pos = newline + 1
    return False
