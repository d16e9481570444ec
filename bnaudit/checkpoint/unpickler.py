"""An inert unpickler: rebuilds containers and lazy tensor references, and never executes the file."""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.bytesource import file_size, is_remote, read_head, shown
from bnaudit.checkpoint.pickle_allowlist import allowed
from bnaudit.checkpoint.pickle_scan import c_unpickler_safe
from bnaudit.checkpoint.types import ITEMSIZE, GlobalRef
from bnaudit.checkpoint.unpickler_calls import USE_UNKNOWN, called_global, tracked_dispatch, with_calls
from bnaudit.checkpoint.unpickler_globals import (
    DATA_BUILTINS,
    MAX_ALLOC,
    REBUILD_MODULES,
    STORAGE_DTYPES,
    STORAGE_MODULES,
    UNTYPED_STORAGES,
    DtypeMarker,
    InertOrderedDict,
    PlaceholderObject,
    StorageResolver,
    StorageType,
    int_tuple,
    is_plain,
    normalise_global,
    one_line,
)
from bnaudit.checkpoint.unpickler_lengths import checked_dispatch, input_size
from bnaudit.checkpoint.unpickler_numpy import NUMERIC_MODULES, NUMPY_MODULES, settle_arrays
from bnaudit.checkpoint.unpickler_rebuild import InertBase
from bnaudit.errors import BnauditError, InputError

# A state dict pickle is a few bytes per tensor; anything this large is not a checkpoint we should trust
# with our memory.
MAX_PICKLE_BYTES = 1 << 30


class CorruptPickleError(InputError):
    """A pickle is corrupt or truncated; ``globals`` are those it referenced before it broke.

    A hostile file may name ``os.system`` and then end in garbage: the audit layer classifies these globals
    so that a dangerous one is still reported (exit 1) rather than lost in a "corrupt file" error.
    """

    globals: tuple[GlobalRef, ...] = ()


# Globals whose stand-in is the unpickler's method of the same name: torch's tensor rebuild functions.
_REBUILDS: dict[str, tuple[str, ...]] = {
    "torch._utils": ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"),
    "torch._tensor": ("_rebuild_from_type_v2", "_rebuild_from_type"),
}


class _InertBehaviour(InertBase):
    """What makes an unpickler inert; mixed into both the pure-Python and the C unpickler below.

    Every global resolves to an inert object and is recorded: containers, torch tensor rebuild functions,
    storage and dtype globals get safe stand-ins; everything else becomes a generated
    :class:`PlaceholderObject` class. Nothing named by the file is imported or called.
    """

    # ----- globals -------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        module, name = normalise_global(str(module), str(name))
        if (module, name) not in self._seen:
            self._seen.add((module, name))
            self.globals.append(GlobalRef(module, name, self.source))
        self.note_named_call((module, name))
        return self._resolve(module, name)

    def _resolve(self, module: str, name: str) -> Any:
        special = self._special.get((module, name))
        if special is not None:
            return special
        if module == "builtins" and name in DATA_BUILTINS:
            return self._data_builtin(name)
        if module in STORAGE_MODULES and name in STORAGE_DTYPES:
            return StorageType(f"{module}.{name}", STORAGE_DTYPES[name], name in UNTYPED_STORAGES)
        if module == "torch" and name in ITEMSIZE:
            return DtypeMarker(name)
        if module in REBUILD_MODULES and name.startswith("_rebuild_"):
            self._warn(
                f"{module}.{name} rebuilds a tensor kind bnaudit does not read (quantized, sparse, "
                "nested, meta or device-specific); those tensors are kept as placeholders and skipped"
            )
        return self.placeholder_class(module, name)

    def _special_globals(self) -> dict[tuple[str, str], Any]:
        # The tensor rebuild functions are the methods of the same name.
        table: dict[tuple[str, str], Any] = {
            (module, name): getattr(self, name) for module, names in _REBUILDS.items() for name in names
        }
        table.update({
            ("collections", "OrderedDict"): InertOrderedDict,
            ("_codecs", "encode"): self._codecs_encode,
            ("copyreg", "_reconstructor"): self._reconstructor,
            ("copyreg", "__newobj__"): self._newobj,
            ("copyreg", "__newobj_ex__"): self._newobj_ex,
            ("torch", "Size"): self._torch_size,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("numpy", "dtype"): self._np_dtype,
        })  # fmt: skip
        table.update({(module, "_reconstruct"): self._np_reconstruct for module in NUMPY_MODULES})
        table.update({(module, "_frombuffer"): self._np_frombuffer for module in NUMERIC_MODULES})
        return table

    # ----- safe stand-ins for the few functions a state dict pickle needs -------------------------------
    def _data_builtin(self, name: str) -> Callable[..., Any]:
        ctor = DATA_BUILTINS[name]

        def build(*args: Any, **kwargs: Any) -> Any:
            values = [*args, *kwargs.values()]
            too_big = name in ("bytes", "bytearray") and any(
                isinstance(a, int) and a > MAX_ALLOC for a in args
            )
            if too_big or not all(is_plain(v) for v in values):
                return self._placeholder("builtins", name, *args)
            return ctor(*args, **kwargs)

        return build

    def _codecs_encode(self, obj: Any, encoding: Any = "utf-8", *rest: Any) -> Any:
        # Protocol 2 writes bytes as _codecs.encode(latin1_text, 'latin1'); that is the only call honoured.
        if isinstance(obj, str) and encoding in ("latin1", "latin-1") and not rest:
            return obj.encode("latin-1")
        return self._placeholder("_codecs", "encode", obj, encoding, *rest)

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        # copyreg._reconstructor runs base.__init__(obj, state) unless base is object.
        if called_global(base) != ("builtins", "object"):
            self.note_call(base, "copyreg._reconstructor")
        if isinstance(cls, type) and issubclass(cls, PlaceholderObject):
            obj = cls.__new__(cls)
            if state is not None:
                obj.args = (state,)
            return obj
        return self._placeholder("copyreg", "_reconstructor", cls, base, state)

    def _newobj(self, cls: Any, *args: Any) -> Any:
        if isinstance(cls, type) and issubclass(cls, PlaceholderObject):
            return cls.__new__(cls, *args)
        if cls is InertOrderedDict:
            return InertOrderedDict()
        return self._placeholder("copyreg", "__newobj__", cls, *args)

    def _newobj_ex(self, cls: Any, args: Any, kwargs: Any) -> Any:
        self.note_call(cls, "copyreg.__newobj_ex__")
        if isinstance(cls, type) and issubclass(cls, PlaceholderObject) and isinstance(kwargs, dict):
            return cls.__new__(cls, *tuple(args), **kwargs)
        return self._placeholder("copyreg", "__newobj_ex__", cls, args, kwargs)

    def _torch_size(self, *args: Any) -> Any:
        sizes = int_tuple(args[0]) if len(args) == 1 else None
        return sizes if sizes is not None else self._placeholder("torch", "Size", *args)


class InertUnpickler(_InertBehaviour, pickle._Unpickler):
    """The inert unpickler on the pure-Python unpickler, whose memo is a dict.

    It takes any pickle, including those :func:`c_unpickler_safe` refuses (a memo index far beyond the
    entries stored, an argument longer than the file), and reads from a stream without reading ahead.
    A declared length over the input's size is refused before anything is allocated
    (:mod:`bnaudit.checkpoint.unpickler_lengths`).
    """

    dispatch = tracked_dispatch(checked_dispatch(pickle._Unpickler.dispatch))
    input_size: int | None = None


class _FastInertUnpickler(_InertBehaviour, pickle.Unpickler):
    """The inert unpickler on the C unpickler: about twice as fast, for pickles that pass the pre-scan."""


_CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    RecursionError,
    MemoryError,
    OverflowError,
    NotImplementedError,
)


def inert_load_file(path: Path, *, where: str | None, fix: str) -> tuple[Any, list[GlobalRef], list[str]]:
    """:func:`inert_load` of a whole file, refused when it is over :data:`MAX_PICKLE_BYTES`.

    Args:
        path: the pickle file.
        where: how messages name it inside its checkpoint (``.metadata``), or None for the file itself.
        fix: what a user with a file over the limit should do.

    Returns:
        (object, globals referenced, warnings), as :func:`inert_load`.

    Raises:
        InputError: the file is over the limit, corrupt or truncated.
    """
    size = file_size(path)
    display = path if where is None else path.parent
    if size > MAX_PICKLE_BYTES:
        raise InputError(
            f"is {size} bytes, over the {MAX_PICKLE_BYTES} byte limit for a pickle",
            path=display,
            where=where,
            fix=fix,
        )
    if is_remote(path):  # an object behind a URL (a remote DCP folder's .metadata): one range read
        return inert_load(read_head(path, size), display=shown(display), source=where or path.name)
    with open(path, "rb") as f:
        return inert_load(f, display=str(display), source=where or path.name)


def inert_load(
    data: bytes | io.BufferedIOBase | io.BytesIO,
    *,
    display: str,
    source: str,
    resolver: StorageResolver | None = None,
) -> tuple[Any, list[GlobalRef], list[str]]:
    """Unpickle one pickle without executing anything from it.

    Args:
        data: the pickle's bytes, or a binary file positioned at its start (left positioned after it).
        display: the user-facing file name for messages.
        source: the entry holding the pickle (e.g. ``archive/data.pkl``), recorded in every GlobalRef.
        resolver: turns torch storage ids into StorageRefs; without it storages become placeholders.

    Returns:
        (object, globals referenced, warnings).

    Raises:
        InputError: the pickle is corrupt, truncated, too large, or refers to storages that are missing.
    """
    fast = False
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_PICKLE_BYTES:
            limit = f"over the {MAX_PICKLE_BYTES} byte limit for a checkpoint pickle"
            raise InputError(f"{source} is {len(data)} bytes, {limit}", path=display, fix="save a state dict")
        fast = c_unpickler_safe(bytes(data))  # bytes() of bytes is the same object, no copy
        data = io.BytesIO(data)
    try:
        obj, unpickler = _run(data, fast, display=display, source=source, resolver=resolver)
        rerun = fast and not all(allowed(g.module, g.name) for g in unpickler.globals)
    except CorruptPickleError:
        if not fast:
            raise
        rerun = True
    if rerun:
        # How a global outside the allowlist is used decides the verdict; only the pure-Python unpickler
        # can tell, so such a pickle is read once more with it (a rare case: user classes, attacks).
        data.seek(0)
        obj, unpickler = _run(data, False, display=display, source=source, resolver=resolver)
    if unpickler.arrays:
        obj = settle_arrays(obj)
    return obj, with_calls(unpickler.globals, unpickler.calls, ""), unpickler.warnings


def _run(
    data: io.BufferedIOBase | io.BytesIO,
    fast: bool,
    *,
    display: str,
    source: str,
    resolver: StorageResolver | None,
) -> tuple[Any, InertUnpickler | _FastInertUnpickler]:
    unpickler_class = _FastInertUnpickler if fast else InertUnpickler
    unpickler = unpickler_class(data, display=display, source=source, resolver=resolver)
    if isinstance(unpickler, InertUnpickler):
        unpickler.input_size = input_size(data)
    try:
        return unpickler.load(), unpickler
    except BnauditError:
        raise
    except _CORRUPT as exc:
        detail = one_line(f"{type(exc).__name__}: {exc}")
        error = CorruptPickleError(
            f"cannot read {source}: pickle is corrupt or truncated ({detail})",
            path=display,
            fix="re-save the checkpoint",
        )
        # A global whose use the pickle never reached might have been called by torch.load.
        error.globals = tuple(with_calls(unpickler.globals, unpickler.calls, USE_UNKNOWN))
        raise error from None
