"""Which globals a pickle calls at load time, and by which opcode, as torch.load's unpickler would.

A global that is only named, or instantiated with ``__new__`` (NEWOBJ) and filled by a plain BUILD, makes
torch.load import its module; one that is *called* runs its code. The inert unpickler builds a placeholder
for every global it does not know; the opcodes below record when a placeholder stands where the real
unpickler would call the real object:

- REDUCE ``f(*args)``, OBJ and INST (``cls(*args)``), NEWOBJ_EX (``cls.__new__(cls, *args, **kwargs)``);
- BUILD with slot state (``setattr`` on the object, which reaches its descriptors);
- the construction helpers that call what they are given: ``copyreg._reconstructor`` calls the base's
  ``__init__``, ``torch._tensor._rebuild_from_type_v2`` calls its function (both recorded by the helpers).

Only the pure-Python unpickler can be hooked per opcode; the C one is used for pickles whose every global is
allowlisted, where how each is used does not matter.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bnaudit.checkpoint.types import GlobalRef
from bnaudit.checkpoint.unpickler_globals import PlaceholderObject

# The use recorded for every global of a pickle that broke before its end: torch.load might have called it.
USE_UNKNOWN = "unknown (the pickle breaks before it shows how the global is used)"


def called_global(target: Any) -> tuple[str, str] | None:
    """The (module, name) a call of ``target`` would reach: a placeholder class, or an object one built."""
    if isinstance(target, type) and issubclass(target, PlaceholderObject):
        cls: type[PlaceholderObject] = target
    elif isinstance(target, PlaceholderObject):
        cls = type(target)
    else:
        return None
    name = cls.placeholder_name
    while name.endswith("()"):  # the result of calling a placeholder: the call reaches the same global
        name = name[:-2]
    return cls.placeholder_module, name


def _peek(offset: int) -> Callable[[Any], Any]:
    def callee(unpickler: Any) -> Any:
        stack = unpickler.stack
        return stack[offset] if len(stack) >= -offset else None

    return callee


def _obj_class(unpickler: Any) -> Any:
    return unpickler.stack[0] if unpickler.stack else None  # OBJ: the class is the first item after MARK


def _slot_build(unpickler: Any) -> Any:
    stack = unpickler.stack
    if len(stack) < 2:
        return None
    state = stack[-1]
    slot_state = isinstance(state, tuple) and len(state) == 2 and bool(state[1])
    return stack[-2] if slot_state else None


_CALLEES: dict[bytes, tuple[str, Callable[[Any], Any]]] = {
    pickle.REDUCE: ("REDUCE", _peek(-2)),
    pickle.NEWOBJ_EX: ("NEWOBJ_EX", _peek(-3)),
    pickle.OBJ: ("OBJ", _obj_class),
    pickle.BUILD: ("BUILD with slot state", _slot_build),
}


def _tracked(
    original: Callable[[Any], None], opcode: str, callee: Callable[[Any], Any]
) -> Callable[..., None]:
    def load(unpickler: Any) -> None:
        unpickler.note_call(callee(unpickler), opcode)
        original(unpickler)

    return load


def _tracked_inst(original: Callable[[Any], None]) -> Callable[..., None]:
    def load(unpickler: Any) -> None:
        # INST names its class inline: find_class records the call while this flag is up.
        unpickler.calling = "INST"
        try:
            original(unpickler)
        finally:
            unpickler.calling = None

    return load


def tracked_dispatch(dispatch: dict[int, Callable[..., Any]]) -> dict[int, Callable[..., Any]]:
    """``dispatch`` with the calling opcodes recording their callee before they run."""
    tracked = dict(dispatch)
    for op, (opcode, callee) in _CALLEES.items():
        tracked[op[0]] = _tracked(dispatch[op[0]], opcode, callee)
    tracked[pickle.INST[0]] = _tracked_inst(dispatch[pickle.INST[0]])
    return tracked


class CallLog:
    """The calls an unpickler saw: global -> the first opcode or helper that called it."""

    calling: str | None = None  # set by INST while its class is looked up
    calls: dict[tuple[str, str], str]  # set by the unpickler's __init__

    def note_call(self, target: Any, how: str) -> None:
        key = called_global(target)
        if key is not None and key not in self.calls:
            self.calls[key] = how

    def note_named_call(self, key: tuple[str, str]) -> None:
        if self.calling is not None and key not in self.calls:
            self.calls[key] = self.calling


def with_calls(refs: list[GlobalRef], calls: dict[tuple[str, str], str], unseen: str) -> list[GlobalRef]:
    """``refs`` with the use each one had (``unseen`` for those never called)."""
    return [replace(g, call=calls.get((g.module, g.name), unseen)) for g in refs]
