"""Inert stand-ins for the NumPy globals a pickled ``numpy.ndarray`` names: arrays become lazy tensors.

``pickle.dump`` of arrays (detectron2's ``{'model': {name: ndarray}}`` files) writes either
``numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` followed by BUILD with the state
``(version, shape, dtype, fortran, raw bytes)`` (protocols 2 to 4), or
``numpy._core.numeric._frombuffer(bytearray, dtype, shape, order)`` (protocol 5); the dtype is
``numpy.dtype(code, False, True)`` with a BUILD state naming its byte order. None of them is imported or
called here: the raw bytes, already in the pickle, are kept as the tensor's inline storage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.types import ITEMSIZE, Placeholder, StorageRef, TensorRef
from bnaudit.checkpoint.unpickler_globals import int_tuple

# NumPy's type code (as numpy.dtype's pickle spells it) -> the torch dtype name bnaudit reads it as.
NUMPY_CODES: dict[str, str] = {
    "f2": "float16", "f4": "float32", "f8": "float64",
    "i1": "int8", "i2": "int16", "i4": "int32", "i8": "int64",
    "u1": "uint8", "u2": "uint16", "u4": "uint32", "u8": "uint64",
    "b1": "bool", "c8": "complex64", "c16": "complex128",
}  # fmt: skip
_LITTLE = frozenset({"<", "|", "="})  # "|": byte order does not apply (one byte); "=": native
NUMPY_MODULES = frozenset({"numpy.core.multiarray", "numpy._core.multiarray"})
NUMERIC_MODULES = frozenset({"numpy.core.numeric", "numpy._core.numeric"})


class NumpyDtype(Placeholder):
    """Inert stand-in for ``numpy.dtype(code, align, copy)``; BUILD then sets its byte order."""

    __hash__ = object.__hash__

    def __init__(self, *args: Any) -> None:
        super().__init__("numpy", "dtype", tuple(args))
        self.byteorder = "|"

    def __setstate__(self, state: Any) -> None:
        self.state = state
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.byteorder = state[1]

    @property
    def torch_name(self) -> str | None:
        """The tensor dtype of a little-endian plain numeric dtype, else None (object, big-endian...)."""
        code = self.args[0] if self.args else None
        if not isinstance(code, str) or self.byteorder not in _LITTLE:
            return None
        return NUMPY_CODES.get(code)


class PendingArray(Placeholder):
    """What ``_reconstruct(numpy.ndarray, ...)`` returns: an empty array whose BUILD state holds the data."""

    __hash__ = object.__hash__

    def __init__(
        self, module: str, args: tuple[Any, ...], make: Callable[[Any, Any, Any, bool], Any]
    ) -> None:
        super().__init__(module, "_reconstruct", args)
        self.tensor: TensorRef | None = None
        self._make = make

    def __setstate__(self, state: Any) -> None:
        self.state = state
        if isinstance(state, tuple) and len(state) == 5 and isinstance(state[3], bool):
            _, shape, dtype, fortran, raw = state
            made = self._make(raw, dtype, shape, fortran)
            self.tensor = made if isinstance(made, TensorRef) else None


def inline_tensor(path: Path, key: str, raw: Any, dtype: Any, shape: Any, fortran: bool) -> TensorRef | str:
    """The lazy tensor of an array's raw bytes kept in memory, or why it cannot be one.

    Args:
        path: the file the pickle is in (named by the storage).
        key: the storage's name (``ndarray/3``), unique in the file.
        raw: the array's bytes as pickled (bytes or bytearray).
        dtype: the :class:`NumpyDtype` stand-in.
        shape: the shape as pickled.
        fortran: the bytes are in column-major order.

    Returns:
        A TensorRef on an inline StorageRef, or a sentence saying what is not readable.
    """
    name = dtype.torch_name if isinstance(dtype, NumpyDtype) else None
    dims = int_tuple(shape)
    if name is None or dims is None or not isinstance(raw, bytes | bytearray):
        return "a NumPy array of an object, structured or big-endian dtype"
    numel = 1
    for n in dims:
        numel *= n
    if len(raw) != numel * ITEMSIZE[name]:
        return f"a NumPy array of shape {list(dims)} with {len(raw)} data bytes (corrupt)"
    strides: list[int] = []
    step = 1
    for n in dims if fortran else reversed(dims):
        strides.append(step)
        step *= n
    stride = tuple(strides) if fortran else tuple(reversed(strides))
    storage = StorageRef(path, key, 0, len(raw), name, inline=bytes(raw))
    return TensorRef(storage, name, dims, stride)


def settle_arrays(root: Any) -> Any:
    """``root`` with every built :class:`PendingArray` in its containers replaced by its tensor.

    Dicts and lists are changed in place (the memo may share them), tuples rebuilt, placeholders' recorded
    state searched too; the walk is iterative and visits each container once, so cycles and deep nesting
    are harmless.
    """
    seen: set[int] = set()
    holder = [root]
    stack: list[Any] = [holder]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            for key in list(obj):  # assigning while iterating an OrderedDict is refused
                obj[key] = _settled(obj[key], stack)
        elif isinstance(obj, list):
            obj[:] = [_settled(value, stack) for value in obj]
        elif isinstance(obj, Placeholder) and not isinstance(obj, PendingArray | NumpyDtype):
            obj.state = _settled(obj.state, stack)
            stack.append(obj.dict_items)
            stack.append(obj.items)
    return holder[0]


def _settled(value: Any, stack: list[Any]) -> Any:
    if isinstance(value, PendingArray):
        return value.tensor if value.tensor is not None else value
    if isinstance(value, tuple):
        stack.extend(v for v in value if isinstance(v, dict | list | Placeholder))
        if any(isinstance(v, PendingArray) for v in value):
            return tuple(
                v.tensor if isinstance(v, PendingArray) and v.tensor is not None else v for v in value
            )
        return value
    if isinstance(value, dict | list | Placeholder):
        stack.append(value)
    return value
