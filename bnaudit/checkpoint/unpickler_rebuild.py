"""The inert unpickler's base: placeholder classes, warnings, and lazy tensors built from torch's rebuilds."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.types import ITEMSIZE, GlobalRef, Placeholder, StorageRef, TensorRef
from bnaudit.checkpoint.unpickler_calls import CallLog
from bnaudit.checkpoint.unpickler_globals import (
    TENSOR_TYPES,
    DtypeMarker,
    PlaceholderObject,
    StorageResolver,
    StorageType,
    int_tuple,
    summary,
)
from bnaudit.checkpoint.unpickler_numpy import NumpyDtype, PendingArray, inline_tensor
from bnaudit.errors import InputError

# No checkpoint names more than a few hundred distinct globals (module classes, tensor machinery).
MAX_PLACEHOLDER_CLASSES = 10_000


class InertBase(CallLog):
    """State and tensor handling shared by both inert unpicklers (see :mod:`bnaudit.checkpoint.unpickler`).

    torch's tensor rebuild functions become lazy :class:`TensorRef` s into the file; storages are located
    through the resolver; anything else a rebuild is given becomes a placeholder.
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
        self.arrays = 0  # NumPy arrays rebuilt, each an inline storage
        self.calls = {}
        self._special: dict[tuple[str, str], Any] = self._special_globals()

    def _special_globals(self) -> dict[tuple[str, str], Any]:
        """The globals with a safe stand-in of their own (the subclass names them)."""
        return {}

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
        if cls is None and len(self._classes) >= MAX_PLACEHOLDER_CLASSES:
            # A class object costs kilobytes: a pickle naming 300,000 globals would take gigabytes. Past the
            # cap the rest share one class (every global is still recorded in ``globals``).
            self._warn(
                f"the pickle names more than {MAX_PLACEHOLDER_CLASSES} distinct globals; the objects of the "
                "rest are one kind of placeholder"
            )
            key = ("<globals>", "<over the limit>")
            cls = self._classes.get(key)
        if cls is None:
            cls = type(
                "Placeholder_" + key[1].replace(".", "_")[:80],
                (PlaceholderObject,),
                {"placeholder_module": key[0], "placeholder_name": key[1], "factory": self.placeholder_class},
            )
            self._classes[key] = cls
        return cls

    def _placeholder(self, module: str, name: str, *args: Any) -> PlaceholderObject:
        return self.placeholder_class(module, name)(*args)

    def _warn(self, what: str) -> None:
        message = f"{self.display}: {self.source}: {what}"
        if message not in self.warnings:
            self.warnings.append(message)

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
                (
                    f"{self.source}: tensor on storage '{storage.key}' has an invalid offset, "
                    f"size or stride ({summary(offset)}, {summary(size)}, {summary(stride)})"
                ),
                path=self.display,
                fix="the file is corrupt — re-save it",
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
            and (new_type.placeholder_module, new_type.placeholder_name) in TENSOR_TYPES
        )
        if plain and callable(func) and getattr(func, "__self__", None) is self and isinstance(args, tuple):
            return func(*args)
        self.note_call(func, "torch._tensor._rebuild_from_type_v2")  # torch calls func(*args)
        type_name = (
            new_type.qualname if isinstance(new_type, Placeholder) else getattr(new_type, "__name__", "?")
        )
        self._warn(f"a tensor subclass ({type_name}) is kept as a placeholder and skipped")
        return self._placeholder("torch._tensor", "_rebuild_from_type_v2", func, new_type, args, *rest)

    def _rebuild_from_type(self, func: Any = None, new_type: Any = None, args: Any = (), *rest: Any) -> Any:
        return self._rebuild_from_type_v2(func, new_type, args, *rest)

    # ----- NumPy arrays (pickle.dump of numpy.ndarray) -----------------------------------------------------
    def _np_dtype(self, *args: Any) -> NumpyDtype:
        return NumpyDtype(*args)

    def _np_array(self, raw: Any, dtype: Any, shape: Any, fortran: bool) -> Any:
        made = inline_tensor(Path(self.display), f"ndarray/{self.arrays}", raw, dtype, shape, fortran)
        if isinstance(made, str):
            self._warn(f"{made} is kept as a placeholder and skipped")
            return None
        self.arrays += 1
        return made

    def _np_reconstruct(self, *args: Any) -> Any:
        # _reconstruct(numpy.ndarray, (0,), b"b") makes an empty array that BUILD fills; a subclass of
        # ndarray (numpy.matrix, masked arrays) stays a plain placeholder.
        cls = args[0] if args else None
        named = (getattr(cls, "placeholder_module", ""), getattr(cls, "placeholder_name", ""))
        if _is_placeholder_class(cls) and named == ("numpy", "ndarray"):
            return PendingArray("numpy._core.multiarray", args, self._np_array)
        return self._placeholder("numpy._core.multiarray", "_reconstruct", *args)

    def _np_frombuffer(self, buf: Any = None, dtype: Any = None, shape: Any = None, order: Any = "C") -> Any:
        made = self._np_array(buf, dtype, shape, order == "F") if order in ("C", "F") else None
        return (
            made if made is not None else self._placeholder("numpy", "_frombuffer", buf, dtype, shape, order)
        )

    # ----- storages -------------------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and _is_placeholder_class(pid[1]):
            # Legacy torch.save(model) names each module class as ("module", class, source file, source):
            # the class is already an inert placeholder (recorded by find_class); the source is only text.
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            self._warn(f"unknown persistent id {summary(pid)} kept as a placeholder")
            return self._placeholder("persistent_load", "id", pid)
        stype, key, numel = pid[1], pid[2], pid[4]
        if not (isinstance(stype, StorageType) and isinstance(key, str) and isinstance(numel, int)):
            self._warn(f"storage id {summary(pid)} names no known storage type; kept as a placeholder")
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
                f"storage '{root.key}' has an invalid view {summary(view)}",
                path=self.display,
                fix="the file is corrupt — re-save it",
            )
        offset, size = parts
        itemsize = ITEMSIZE[root.dtype]
        if (offset + size) * itemsize > root.nbytes:
            raise InputError(
                f"storage view '{view[0]}' ends past storage '{root.key}' ({root.nbytes} bytes)",
                path=self.display,
                fix="the file is corrupt — re-save it",
            )
        return replace(
            root, key=view[0], file_offset=root.file_offset + offset * itemsize, nbytes=size * itemsize
        )


def _is_placeholder_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, PlaceholderObject)
