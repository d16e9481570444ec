"""The inert stand-ins the unpickler gives a pickle's globals, and the tables that decide which one."""

from __future__ import annotations

import _compat_pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar

from bnaudit.checkpoint.types import Placeholder, StorageRef

# Storage classes name their element type; quantized storages keep their raw integer type (the tensors
# built on them are placeholders anyway).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "int8", "QUInt8Storage": "uint8", "QInt32Storage": "int32",
    "QUInt4x2Storage": "uint8", "QUInt2x4Storage": "uint8",
    "UntypedStorage": "uint8", "TypedStorage": "uint8", "_UntypedStorage": "uint8",
}  # fmt: skip
UNTYPED_STORAGES = frozenset({"UntypedStorage", "_UntypedStorage", "TypedStorage"})
STORAGE_MODULES = frozenset({"torch", "torch.storage", "torch.cuda"})
TENSOR_TYPES = frozenset(
    {
        ("torch", "Tensor"),
        ("torch._tensor", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch.nn", "Parameter"),
        ("torch.nn.parameter", "Buffer"),
    }
)
REBUILD_MODULES = frozenset({"torch._utils", "torch._tensor", "torch"})
# Harmless pure-data builtins; they are wrapped so that only plain data reaches them.
DATA_BUILTINS: dict[str, Callable[..., Any]] = {
    "dict": dict, "list": list, "set": set, "tuple": tuple, "frozenset": frozenset, "int": int,
    "float": float, "str": str, "bytes": bytes, "bytearray": bytearray, "complex": complex, "bool": bool,
    "slice": slice,
}  # fmt: skip
PLAIN_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    tuple,
    list,
    dict,
    set,
    frozenset,
)
# bytes(n) / bytearray(n) allocate n zero bytes: cap n so a tiny pickle cannot ask for gigabytes.
MAX_ALLOC = 1 << 24

StorageResolver = Callable[[str, str, int], StorageRef]
"""Maps (storage key, storage dtype, expected byte size) to the storage's place in the file."""


@dataclass(frozen=True)
class StorageType:
    """Inert stand-in for a torch storage class global such as ``torch.FloatStorage``."""

    qualname: str
    dtype: str  # ``uint8`` for untyped storages, whose sizes count bytes
    untyped: bool


@dataclass(frozen=True)
class DtypeMarker:
    """Inert stand-in for a torch dtype global such as ``torch.float32``."""

    name: str


class InertOrderedDict(OrderedDict[Any, Any]):
    """An OrderedDict that accepts the attributes (``_metadata``) BUILD sets on torch state dicts."""

    def __setstate__(self, state: Any) -> None:
        # BUILD may send (dict_state, slot_state); both only ever land in the instance __dict__, never in
        # setattr, so a pickle cannot reach a property or __class__.
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if isinstance(part, dict):
                for key, value in part.items():
                    if isinstance(key, str):
                        self.__dict__[key] = value

    @property
    def metadata(self) -> Any:
        """The ``_metadata`` attribute torch attaches to state dicts (None when absent)."""
        return self.__dict__.get("_metadata")


class PlaceholderObject(Placeholder):
    """Base of the placeholder classes generated per (module, name): every pickle operation only records."""

    placeholder_module: ClassVar[str] = ""
    placeholder_name: ClassVar[str] = ""
    factory: ClassVar[Callable[[str, str], type[PlaceholderObject]] | None] = None
    # Placeholders may be dict keys or set members inside a pickle, so they hash by identity.
    __hash__ = object.__hash__

    def __new__(cls, *args: Any, **kwargs: Any) -> PlaceholderObject:
        self = object.__new__(cls)
        Placeholder.__init__(self, cls.placeholder_module, cls.placeholder_name, tuple(args), kwargs=kwargs)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # __new__ recorded everything; REDUCE calls cls(*args) which runs both.
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def add(self, item: Any) -> None:
        self.items.append(item)

    def __call__(self, *args: Any, **kwargs: Any) -> PlaceholderObject:
        # Hostile pickles chain calls (getattr(...)(...)): calling a placeholder records another one.
        factory = type(self).factory
        cls = factory(self.module, f"{self.name}()") if factory else type(self)
        return cls(*args, **kwargs)


def normalise_global(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 spellings (``__builtin__.eval``, ``copy_reg``) to Python 3 ones, as pickle does.

    Args:
        module: the module named by the pickle.
        name: the attribute named by the pickle.

    Returns:
        The (module, name) pair Python 3 would import.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


_SHOWN_ITEMS = 4
_SHOWN_CHARS = 40


def summary(value: Any, depth: int = 2) -> str:
    """A short description of a value a file built: at most a few items of each container, ``depth`` levels.

    Messages never ``repr`` what a pickle built: a list holding itself twice per level through the memo is a
    few hundred bytes of pickle whose ``repr`` is exponentially long (or runs past the recursion limit), and
    an int of millions of digits takes long to print. This costs at most ``_SHOWN_ITEMS ** depth`` steps.
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, str | bytes | bytearray):
        text = repr(value[:_SHOWN_CHARS])
        return text + ("..." if len(value) > _SHOWN_CHARS else "")
    if isinstance(value, Placeholder):
        return f"<{one_line(value.qualname, _SHOWN_CHARS)}>"
    if isinstance(value, tuple | list | dict | set | frozenset):
        if depth <= 0:
            return f"<{type(value).__name__} of {len(value)}>"
        if isinstance(value, dict):
            pairs = islice(value.items(), _SHOWN_ITEMS)
            shown = [f"{summary(k, depth - 1)}: {summary(v, depth - 1)}" for k, v in pairs]
        else:
            shown = [summary(v, depth - 1) for v in islice(value, _SHOWN_ITEMS)]
        more = ", ..." if len(value) > _SHOWN_ITEMS else ""
        brackets = "()" if isinstance(value, tuple) else "[]" if isinstance(value, list) else "{}"
        return f"{brackets[0]}{', '.join(shown)}{more}{brackets[1]}"
    return f"<{one_line(type(value).__name__, _SHOWN_CHARS)}>"


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_plain(value: Any) -> bool:
    return isinstance(value, PLAIN_TYPES) and not isinstance(value, Placeholder)


def int_tuple(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (shapes, strides), or None when it is not one."""
    if not isinstance(value, tuple | list):
        return None
    for v in value:  # a plain loop: this runs for every tensor's shape and stride
        if type(v) is not int or v < 0:  # exactly int: bool and other int subclasses are not sizes
            return None
    return tuple(value)
