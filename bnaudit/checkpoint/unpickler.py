"""An inert unpickler: rebuilds containers and lazy tensor references, and never executes the file."""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from bnaudit.checkpoint.pickle_scan import c_unpickler_safe
from bnaudit.checkpoint.types import ITEMSIZE, GlobalRef, Placeholder, StorageRef, TensorRef
from bnaudit.errors import BnauditError, InputError

# A state dict pickle is a few bytes per tensor; anything this large is not a checkpoint we should trust
# with our memory.
MAX_PICKLE_BYTES = 1 << 30

# Storage classes name their element type; quantized storages keep their raw integer type (the tensors
# built on them are placeholders anyway).
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "int8", "QUInt8Storage": "uint8", "QInt32Storage": "int32",
    "QUInt4x2Storage": "uint8", "QUInt2x4Storage": "uint8",
    "UntypedStorage": "uint8", "TypedStorage": "uint8", "_UntypedStorage": "uint8",
}  # fmt: skip
_UNTYPED_STORAGES = frozenset({"UntypedStorage", "_UntypedStorage", "TypedStorage"})
_STORAGE_MODULES = frozenset({"torch", "torch.storage", "torch.cuda"})
_TENSOR_TYPES = frozenset(
    {
        ("torch", "Tensor"),
        ("torch._tensor", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch.nn", "Parameter"),
        ("torch.nn.parameter", "Buffer"),
    }
)
_REBUILD_MODULES = frozenset({"torch._utils", "torch._tensor", "torch"})
# Harmless pure-data builtins; they are wrapped so that only plain data reaches them.
_DATA_BUILTINS: dict[str, Callable[..., Any]] = {
    "dict": dict, "list": list, "set": set, "tuple": tuple, "frozenset": frozenset, "int": int,
    "float": float, "str": str, "bytes": bytes, "bytearray": bytearray, "complex": complex, "bool": bool,
    "slice": slice,
}  # fmt: skip
_PLAIN_TYPES = (
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
_MAX_ALLOC = 1 << 24

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


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_plain(value: Any) -> bool:
    return isinstance(value, _PLAIN_TYPES) and not isinstance(value, Placeholder)


def int_tuple(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (shapes, strides), or None when it is not one."""
    if not isinstance(value, tuple | list):
        return None
    for v in value:  # a plain loop: this runs for every tensor's shape and stride
        if type(v) is not int or v < 0:  # exactly int: bool and other int subclasses are not sizes
            return None
    return tuple(value)


class _InertBehaviour:
    """What makes an unpickler inert; mixed into both the pure-Python and the C unpickler below.

    Every global resolves to an inert object and is recorded: containers, torch tensor rebuild functions,
    storage and dtype globals get safe stand-ins; everything else becomes a generated
    :class:`PlaceholderObject` class. Nothing named by the file is imported or called.
    """

    def __init__(
        self,
        file: io.BufferedIOBase | io.BytesIO,
        *,
        display: str,
        source: str,
        resolver: StorageResolver | None = None,
    ) -> None:
        super().__init__(file)  # type: ignore[call-arg]  # the unpickler base that follows in the MRO
        self.display = display
        self.source = source
        self.resolver = resolver
        self.globals: list[GlobalRef] = []
        self.warnings: list[str] = []
        self._seen: set[tuple[str, str]] = set()
        self._classes: dict[tuple[str, str], type[PlaceholderObject]] = {}
        self._storages: dict[str, StorageRef] = {}
        self._special: dict[tuple[str, str], Any] = self._special_globals()

    # ----- globals -------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        module, name = normalise_global(str(module), str(name))
        if (module, name) not in self._seen:
            self._seen.add((module, name))
            self.globals.append(GlobalRef(module, name, self.source))
        return self._resolve(module, name)

    def _resolve(self, module: str, name: str) -> Any:
        special = self._special.get((module, name))
        if special is not None:
            return special
        if module == "builtins" and name in _DATA_BUILTINS:
            return self._data_builtin(name)
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return StorageType(f"{module}.{name}", _STORAGE_DTYPES[name], name in _UNTYPED_STORAGES)
        if module == "torch" and name in ITEMSIZE:
            return DtypeMarker(name)
        if module in _REBUILD_MODULES and name.startswith("_rebuild_"):
            self._warn(
                f"{module}.{name} rebuilds a tensor kind bnaudit does not read (quantized, sparse, "
                "nested, meta or device-specific); those tensors are kept as placeholders and skipped"
            )
        return self.placeholder_class(module, name)

    def _special_globals(self) -> dict[tuple[str, str], Any]:
        return {
            ("collections", "OrderedDict"): InertOrderedDict,
            ("_codecs", "encode"): self._codecs_encode,
            ("copyreg", "_reconstructor"): self._reconstructor,
            ("copyreg", "__newobj__"): self._newobj,
            ("copyreg", "__newobj_ex__"): self._newobj_ex,
            ("torch", "Size"): self._torch_size,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch._tensor", "_rebuild_from_type"): self._rebuild_from_type,
        }

    def placeholder_class(self, module: str, name: str) -> type[PlaceholderObject]:
        """The generated placeholder class for ``module.name`` (one per name and unpickler).

        Args:
            module: the module the pickle named.
            name: the attribute the pickle named.

        Returns:
            A subclass of :class:`PlaceholderObject` whose instances record their construction.
        """
        key = (module, name)
        cls = self._classes.get(key)
        if cls is None:
            cls = type(
                "Placeholder_" + name.replace(".", "_")[:80],
                (PlaceholderObject,),
                {"placeholder_module": module, "placeholder_name": name, "factory": self.placeholder_class},
            )
            self._classes[key] = cls
        return cls

    def _placeholder(self, module: str, name: str, *args: Any) -> PlaceholderObject:
        return self.placeholder_class(module, name)(*args)

    def _warn(self, what: str) -> None:
        message = f"{self.display}: {self.source}: {what}"
        if message not in self.warnings:
            self.warnings.append(message)

    # ----- safe stand-ins for the few functions a state dict pickle needs -------------------------------
    def _data_builtin(self, name: str) -> Callable[..., Any]:
        ctor = _DATA_BUILTINS[name]

        def build(*args: Any, **kwargs: Any) -> Any:
            values = [*args, *kwargs.values()]
            too_big = name in ("bytes", "bytearray") and any(
                isinstance(a, int) and a > _MAX_ALLOC for a in args
            )
            if too_big or not all(_is_plain(v) for v in values):
                return self._placeholder("builtins", name, *args)
            return ctor(*args, **kwargs)

        return build

    def _codecs_encode(self, obj: Any, encoding: Any = "utf-8", *rest: Any) -> Any:
        # Protocol 2 writes bytes as _codecs.encode(latin1_text, 'latin1'); that is the only call honoured.
        if isinstance(obj, str) and encoding in ("latin1", "latin-1") and not rest:
            return obj.encode("latin-1")
        return self._placeholder("_codecs", "encode", obj, encoding, *rest)

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
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
        if isinstance(cls, type) and issubclass(cls, PlaceholderObject) and isinstance(kwargs, dict):
            return cls.__new__(cls, *tuple(args), **kwargs)
        return self._placeholder("copyreg", "__newobj_ex__", cls, args, kwargs)

    def _torch_size(self, *args: Any) -> Any:
        sizes = int_tuple(args[0]) if len(args) == 1 else None
        return sizes if sizes is not None else self._placeholder("torch", "Size", *args)

    # ----- tensors --------------------------------------------------------------------------------------
    def _make_tensor(self, func: str, args: tuple[Any, ...], dtype: Any = None) -> Any:
        storage, offset, size, stride = (list(args) + [None] * 4)[:4]
        requires_grad = len(args) > 4 and args[4] is True
        shape, strides = int_tuple(size), int_tuple(stride)
        ok_offset = isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0
        name = dtype.name if isinstance(dtype, DtypeMarker) else None
        if not isinstance(storage, StorageRef) or (dtype is not None and name is None):
            self._warn(
                f"torch._utils.{func} got a storage or dtype bnaudit cannot read; the tensor is skipped"
            )
            return self._placeholder("torch._utils", func, *args)
        if shape is None or strides is None or len(shape) != len(strides) or not ok_offset:
            raise InputError(
                f"{self.display}: {self.source}: tensor on storage '{storage.key}' has an invalid offset, "
                f"size or stride ({offset!r}, {size!r}, {stride!r}); the file is corrupt — re-save it"
            )
        if name is not None and name != storage.dtype:
            storage = replace(storage, dtype=name)
        return TensorRef(storage, storage.dtype, shape, strides, offset, requires_grad)

    def _rebuild_tensor(self, *args: Any) -> Any:
        return self._make_tensor("_rebuild_tensor", args)

    def _rebuild_tensor_v2(self, *args: Any) -> Any:
        return self._make_tensor("_rebuild_tensor_v2", args)

    def _rebuild_tensor_v3(self, *args: Any) -> Any:
        if len(args) < 7:
            return self._make_tensor("_rebuild_tensor_v3", args, dtype=object())
        return self._make_tensor("_rebuild_tensor_v3", args[:6], dtype=args[6])

    def _rebuild_parameter(self, data: Any = None, requires_grad: Any = False, *rest: Any) -> Any:
        if isinstance(data, TensorRef):
            return replace(data, requires_grad=requires_grad is True)
        return self._placeholder("torch._utils", "_rebuild_parameter", data, requires_grad, *rest)

    def _rebuild_from_type_v2(
        self, func: Any = None, new_type: Any = None, args: Any = (), *rest: Any
    ) -> Any:
        plain = (
            isinstance(new_type, type)
            and issubclass(new_type, PlaceholderObject)
            and (new_type.placeholder_module, new_type.placeholder_name) in _TENSOR_TYPES
        )
        if plain and callable(func) and getattr(func, "__self__", None) is self and isinstance(args, tuple):
            return func(*args)
        type_name = (
            new_type.qualname if isinstance(new_type, Placeholder) else getattr(new_type, "__name__", "?")
        )
        self._warn(f"a tensor subclass ({type_name}) is kept as a placeholder and skipped")
        return self._placeholder("torch._tensor", "_rebuild_from_type_v2", func, new_type, args, *rest)

    def _rebuild_from_type(self, func: Any = None, new_type: Any = None, args: Any = (), *rest: Any) -> Any:
        return self._rebuild_from_type_v2(func, new_type, args, *rest)

    # ----- storages -------------------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            self._warn(f"unknown persistent id {_one_line(repr(pid), 80)} kept as a placeholder")
            return self._placeholder("persistent_load", "id", pid)
        stype, key, numel = pid[1], pid[2], pid[4]
        if not (isinstance(stype, StorageType) and isinstance(key, str) and isinstance(numel, int)):
            self._warn(
                f"storage id {_one_line(repr(pid), 80)} names no known storage type; kept as a placeholder"
            )
            return self._placeholder("persistent_load", "storage", pid)
        if self.resolver is None:
            self._warn("a plain pickle refers to torch storages it does not contain; they are skipped")
            return self._placeholder("persistent_load", "storage", pid)
        ref = self._storages.get(key)
        if ref is None:
            ref = self.resolver(key, stype.dtype, numel * ITEMSIZE[stype.dtype])
            self._storages[key] = ref
        if len(pid) == 6 and pid[5] is not None:
            return self._storage_view(ref, pid[5])
        return ref if ref.dtype == stype.dtype else replace(ref, dtype=stype.dtype)

    def _storage_view(self, root: StorageRef, view: Any) -> StorageRef:
        # Pre-1.0 legacy files could save a view of a storage: (view_key, offset, size) in elements.
        parts = int_tuple(view[1:]) if isinstance(view, tuple) and len(view) == 3 else None
        if parts is None or not isinstance(view[0], str):
            raise InputError(
                f"{self.display}: storage '{root.key}' has an invalid view {view!r}; "
                "the file is corrupt — re-save it"
            )
        offset, size = parts
        itemsize = ITEMSIZE[root.dtype]
        if (offset + size) * itemsize > root.nbytes:
            raise InputError(
                f"{self.display}: storage view '{view[0]}' ends past storage '{root.key}' "
                f"({root.nbytes} bytes); the file is corrupt — re-save it"
            )
        return replace(
            root, key=view[0], file_offset=root.file_offset + offset * itemsize, nbytes=size * itemsize
        )


class InertUnpickler(_InertBehaviour, pickle._Unpickler):
    """The inert unpickler on the pure-Python unpickler, whose memo is a dict.

    It takes any pickle, including those :func:`c_unpickler_safe` refuses (a memo index far beyond the
    entries stored, an argument longer than the file), and reads from a stream without reading ahead.
    """


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
    unpickler_class: type[InertUnpickler | _FastInertUnpickler] = InertUnpickler
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_PICKLE_BYTES:
            raise InputError(
                f"{display}: {source} is {len(data)} bytes, over the {MAX_PICKLE_BYTES} byte limit for a "
                "checkpoint pickle; save a state dict instead"
            )
        if c_unpickler_safe(bytes(data)):  # bytes() of bytes is the same object, no copy
            unpickler_class = _FastInertUnpickler
        data = io.BytesIO(data)
    unpickler = unpickler_class(data, display=display, source=source, resolver=resolver)
    try:
        obj = unpickler.load()
    except BnauditError:
        raise
    except _CORRUPT as exc:
        detail = _one_line(f"{type(exc).__name__}: {exc}")
        raise InputError(
            f"{display}: cannot read {source}: pickle is corrupt or truncated ({detail}); "
            "re-save the checkpoint"
        ) from None
    return obj, unpickler.globals, unpickler.warnings
