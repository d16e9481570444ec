"""Reader for torch.distributed.checkpoint (DCP) folders: inert ``.metadata``, lazy ``*.distcp`` tensors."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from bnaudit.checkpoint.torchzip import ZIP_READ_ERRORS, ZipEntry, archive_prefix, read_entries
from bnaudit.checkpoint.types import ITEMSIZE, Checkpoint, GlobalRef, Placeholder, StorageRef, TensorRef
from bnaudit.checkpoint.unpickler import (
    MAX_PICKLE_BYTES,
    DtypeMarker,
    StorageResolver,
    inert_load,
    int_tuple,
)
from bnaudit.errors import BnauditError, InputError

METADATA_FILE = ".metadata"
_META_MODULE = "torch.distributed.checkpoint.metadata"
# A non-tensor item (epoch, a config dict) is a small torch.save'd object; anything bigger is not read.
MAX_BYTES_ITEM = 64 << 20
# When .metadata carries no planner_data (old torch, custom planners), only these first FQN components are
# taken as the top-level keys of the saved dict; any other dotted key stays flat (a bare model state dict).
KNOWN_TOP_KEYS = frozenset(
    {"model", "state_dict", "model_ema", "state_dict_ema", "ema", "ema_model", "optim", "optimizer"}
)
_CONVERT = "convert it with torch.distributed.checkpoint.format_utils.dcp_to_torch_save and audit the result"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class RefusedTensorRef(TensorRef):
    """A DCP tensor bnaudit knows the shape and dtype of but will not read; ``to_numpy`` says why."""

    reason: str = ""

    def to_numpy(self) -> np.ndarray:
        raise InputError(self.reason)


@dataclass(frozen=True)
class ChunkedTensorRef(TensorRef):
    """A DCP tensor saved in several chunks (sharded by FSDP / DTensor); assembled only when read.

    Attributes:
        chunks: (offsets of the chunk in the whole tensor, the chunk's own lazy tensor), one per chunk.
        display: the folder and key, for messages.
    """

    chunks: tuple[tuple[tuple[int, ...], TensorRef], ...] = ()
    display: str = ""

    def to_numpy(self) -> np.ndarray:
        """Read every chunk and place it; refuse when the chunks do not cover the tensor exactly once."""
        out: np.ndarray | None = None
        covered = np.zeros(self.shape, dtype=np.uint8)
        for offsets, chunk in self.chunks:
            values = chunk.to_numpy()
            where = tuple(slice(o, o + n) for o, n in zip(offsets, chunk.shape, strict=True))
            if out is None:
                out = np.zeros(self.shape, dtype=values.dtype)
            out[where] = values
            covered[where] += 1
        if out is None or not np.all(covered == 1):
            raise InputError(
                f"{self.display}: the {len(self.chunks)} saved chunks do not cover the tensor of shape "
                f"{list(self.shape)} exactly once; the checkpoint is incomplete or corrupt — {_CONVERT}"
            )
        return out


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes at ``start`` of an open file, so zipfile can parse an archive
    embedded in a ``.distcp`` file without the file being read into memory."""

    def __init__(self, file: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        n = max(0, min(len(view), self._length - self._pos))
        self._file.seek(self._start + self._pos)
        data = self._file.read(n)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _fields(obj: Any) -> dict[str, Any] | None:
    """The attributes a pickled dataclass placeholder carries (its BUILD state), or None."""
    if not isinstance(obj, Placeholder):
        return None
    state = obj.state
    parts = state if isinstance(state, tuple) else (state,)
    found: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, Mapping):
            found.update({k: v for k, v in part.items() if isinstance(k, str)})
    found.update(obj.kwargs)
    return found


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclass(frozen=True)
class _Stored:
    """Where one item (or chunk) lies: a ``_StorageInfo`` of the metadata."""

    relative_path: str
    offset: int
    length: int
    transformed: bool


@dataclass
class _Metadata:
    items: dict[str, Any]  # FQN -> TensorStorageMetadata / BytesStorageMetadata placeholder
    storage: dict[tuple[str, tuple[int, ...] | None], _Stored]
    planner_data: Any


class _DcpReader:
    """Turns one DCP folder's metadata into a nested container of lazy tensors and inert objects."""

    def __init__(self, folder: Path, globals_: list[GlobalRef], warnings: list[str]) -> None:
        self.folder = folder
        self.globals = globals_
        self.warnings = warnings
        self._seen_globals = {g.qualname for g in globals_}
        self._sizes: dict[str, int] = {}

    # ----- metadata ------------------------------------------------------------------------------------
    def metadata(self, root: Any) -> _Metadata:
        fields = _fields(root)
        if not (isinstance(root, Placeholder) and root.qualname == f"{_META_MODULE}.Metadata" and fields):
            found = root.qualname if isinstance(root, Placeholder) else type(root).__name__
            raise InputError(
                f"{self.folder}: {METADATA_FILE} holds a {found}, not a torch.distributed.checkpoint "
                f"Metadata object; the folder is not a DCP checkpoint or its {METADATA_FILE} is corrupt"
            )
        items, storage = fields.get("state_dict_metadata"), fields.get("storage_data")
        if not isinstance(items, Mapping) or not isinstance(storage, Mapping):
            raise InputError(
                f"{self.folder}: {METADATA_FILE} lacks state_dict_metadata or storage_data mappings; "
                f"it is corrupt or from an unknown DCP version — {_CONVERT}"
            )
        stored = {}
        for index, info in storage.items():
            key, where = self._storage_entry(index, info)
            stored[key] = where
        named = {k: v for k, v in items.items() if isinstance(k, str)}
        return _Metadata(named, stored, fields.get("planner_data"))

    def _storage_entry(self, index: Any, info: Any) -> tuple[tuple[str, tuple[int, ...] | None], _Stored]:
        idx, where = _fields(index) or {}, _fields(info) or {}
        fqn, offset = idx.get("fqn"), idx.get("offset")
        rel, start, length = where.get("relative_path"), where.get("offset"), where.get("length")
        ok = (
            isinstance(fqn, str)
            and isinstance(rel, str)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, length))
        )
        if not ok:
            raise InputError(
                f"{self.folder}: {METADATA_FILE} has a storage_data entry without a file name, offset "
                f"and length ({fqn!r}, {rel!r}, {start!r}, {length!r}); it is corrupt — re-save it"
            )
        assert isinstance(fqn, str) and isinstance(rel, str)
        assert isinstance(start, int) and isinstance(length, int)
        transformed = bool(where.get("transform_descriptors"))
        return (fqn, int_tuple(offset)), _Stored(rel, start, length, transformed)

    # ----- items ---------------------------------------------------------------------------------------
    def item(self, fqn: str, entry: Any, meta: _Metadata) -> Any:
        """The lazy tensor or inert object stored under ``fqn``."""
        if isinstance(entry, Placeholder) and entry.name == "BytesStorageMetadata":
            where = meta.storage.get((fqn, None))
            if where is None:
                raise self._missing(fqn, None)
            return self._bytes_item(fqn, where)
        fields = _fields(entry)
        if not (isinstance(entry, Placeholder) and entry.name == "TensorStorageMetadata" and fields):
            self.warnings.append(
                f"{self.folder}: item '{fqn}' has unknown metadata {type(entry).__name__}; it is skipped"
            )
            return entry
        return self._tensor_item(fqn, fields, meta)

    def _tensor_item(self, fqn: str, fields: dict[str, Any], meta: _Metadata) -> Any:
        dtype, shape = self._dtype(fqn, fields.get("properties")), int_tuple(fields.get("size"))
        chunks = fields.get("chunks")
        if shape is None or not isinstance(chunks, list) or not chunks:
            raise InputError(
                f"{self.folder}: {METADATA_FILE} describes tensor '{fqn}' without a valid size and chunks; "
                f"it is corrupt — re-save the checkpoint"
            )
        parts = []
        for chunk in chunks:
            cf = _fields(chunk) or {}
            offsets, sizes = int_tuple(cf.get("offsets")), int_tuple(cf.get("sizes"))
            if offsets is None or sizes is None or len(offsets) != len(shape) or len(sizes) != len(shape):
                raise InputError(
                    f"{self.folder}: tensor '{fqn}' has a chunk with invalid offsets or sizes "
                    f"({cf.get('offsets')!r}, {cf.get('sizes')!r}); {METADATA_FILE} is corrupt"
                )
            where = meta.storage.get((fqn, offsets))
            if where is None:
                raise self._missing(fqn, offsets)
            parts.append((offsets, self._chunk(fqn, where, dtype, sizes)))
        if len(parts) == 1 and parts[0][1].shape == shape and not any(parts[0][0]):
            return parts[0][1]
        self.warnings.append(
            f"{self.folder}: tensor '{fqn}' is saved in {len(parts)} chunks (sharded); it is assembled "
            "only if read"
        )
        storage = StorageRef(self.folder / METADATA_FILE, fqn, 0, 0, dtype)
        return ChunkedTensorRef(
            storage, dtype, shape, _contiguous(shape), chunks=tuple(parts), display=f"{self.folder}: '{fqn}'"
        )

    def _dtype(self, fqn: str, properties: Any) -> str:
        # TensorProperties pickles as (dtype, layout, requires_grad, memory_format, pin_memory) in recent
        # torch; older versions pickled its __dict__.
        state = properties.state if isinstance(properties, Placeholder) else None
        value = state[0] if isinstance(state, tuple) and state else (_fields(properties) or {}).get("dtype")
        if isinstance(value, DtypeMarker) and value.name in ITEMSIZE:
            return value.name
        raise InputError(
            f"{self.folder}: tensor '{fqn}' has dtype {value!r} in {METADATA_FILE}, not a torch dtype "
            f"bnaudit reads; {_CONVERT}"
        )

    def _missing(self, fqn: str, offsets: tuple[int, ...] | None) -> InputError:
        at = "" if offsets is None else f" (chunk at {list(offsets)})"
        return InputError(
            f"{self.folder}: item '{fqn}'{at} is listed in {METADATA_FILE} but has no storage_data entry; "
            "the checkpoint is incomplete or corrupt — re-save it"
        )

    # ----- data files ----------------------------------------------------------------------------------
    def _data_file(self, fqn: str, where: _Stored) -> Path:
        # File names come from an untrusted pickle: keep them inside the folder.
        name = where.relative_path
        pure = PurePosixPath(name)
        path = self.folder / pure
        if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise InputError(
                f"{self.folder}: item '{fqn}' names data file {where.relative_path!r}, which is not a file "
                f"inside the folder; {METADATA_FILE} is corrupt or crafted"
            )
        size = self._sizes.get(where.relative_path)
        if size is None:
            if not path.is_file():
                raise InputError(
                    f"{self.folder}: data file '{where.relative_path}' (holding '{fqn}') is missing; copy "
                    "every *.distcp file of the checkpoint"
                )
            size = self._sizes[where.relative_path] = path.stat().st_size
        if where.offset + where.length > size:
            raise InputError(
                f"{self.folder}: item '{fqn}' spans bytes {where.offset}..{where.offset + where.length} of "
                f"'{where.relative_path}', which has {size} bytes; the file is truncated — copy it again"
            )
        return path

    def _chunk(self, fqn: str, where: _Stored, dtype: str, shape: tuple[int, ...]) -> TensorRef:
        path = self._data_file(fqn, where)
        label = f"{where.relative_path}@{where.offset}"
        if where.transformed:
            return self._refused(
                path, label, dtype, shape, f"'{fqn}' is stored with DCP transforms (e.g. compression)"
            )
        with open(path, "rb") as f:
            f.seek(where.offset)
            magic = f.read(len(_ZIP_MAGIC))
            if magic == _ZIP_MAGIC:
                found = self._embedded(path, f, where, fqn, tensor=True)
                return self._check_chunk(path, label, fqn, found, dtype, shape)
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if where.length != numel * ITEMSIZE[dtype]:
            raise InputError(
                f"{self.folder}: '{fqn}' in '{where.relative_path}' at byte {where.offset} is neither a "
                f"torch.save archive nor {numel * ITEMSIZE[dtype]} raw bytes of {dtype} (found "
                f"{where.length} bytes); the file is corrupt — re-save the checkpoint"
            )
        storage = StorageRef(path, label, where.offset, where.length, dtype)
        return TensorRef(storage, dtype, shape, _contiguous(shape))

    def _refused(self, path: Path, label: str, dtype: str, shape: tuple[int, ...], why: str) -> TensorRef:
        storage = StorageRef(path, label, 0, 0, dtype)
        reason = f"{self.folder}: {why}, which bnaudit does not read; {_CONVERT}"
        self.warnings.append(reason)
        return RefusedTensorRef(storage, dtype, shape, _contiguous(shape), reason=reason)

    def _check_chunk(
        self, path: Path, label: str, fqn: str, found: Any, dtype: str, shape: tuple[int, ...]
    ) -> TensorRef:
        if isinstance(found, TensorRef) and found.storage.compressed:
            return self._refused(path, label, dtype, shape, f"'{fqn}' is stored deflated")
        if not isinstance(found, TensorRef):
            return self._refused(path, label, dtype, shape, f"'{fqn}' is not a plain tensor archive")
        if found.shape != shape or found.dtype != dtype:
            raise InputError(
                f"{self.folder}: '{fqn}' in '{label}' is a {found.dtype} tensor of shape {list(found.shape)} "
                f"but {METADATA_FILE} says {dtype} {list(shape)}; the checkpoint is corrupt — re-save it"
            )
        return found

    def _embedded(self, path: Path, f: IO[bytes], where: _Stored, fqn: str, tensor: bool) -> Any:
        """Inertly load the torch.save archive DCP embedded at ``where``; its storages stay lazy."""
        label = f"{where.relative_path}@{where.offset}"
        try:
            with zipfile.ZipFile(_Window(f, where.offset, where.length)) as zf:
                names = zf.namelist()
                prefix = archive_prefix(path, names)
                entries = read_entries(path, zf, where.offset + where.length, base=where.offset)
                pkl = entries[prefix + "data.pkl"]
                if pkl.size > min(MAX_PICKLE_BYTES, MAX_BYTES_ITEM):
                    raise InputError(f"its pickle is {pkl.size} bytes, over the {MAX_BYTES_ITEM} byte limit")
                data = zf.read(pkl.name)
        except (*ZIP_READ_ERRORS, zipfile.LargeZipFile, KeyError, struct.error) as exc:
            raise InputError(
                f"{self.folder}: '{fqn}' in '{label}' is not a readable torch.save archive ({exc}); the file "
                "is corrupt — re-save the checkpoint"
            ) from None
        except InputError as exc:
            raise InputError(f"{self.folder}: '{fqn}' in '{label}': {exc}") from None
        root, refs, warnings = inert_load(
            data,
            display=str(self.folder),
            source=f"{label}/{pkl.name}",
            resolver=_resolver(path, label, prefix, entries),
        )
        self._record(refs, dedupe=tensor)
        self.warnings.extend(w for w in warnings if w not in self.warnings)
        return root

    def _record(self, refs: list[GlobalRef], dedupe: bool) -> None:
        # Every tensor of a DCP checkpoint is its own small torch.save archive: record each global once,
        # with the first archive naming it, so a listing does not repeat the tensor machinery per tensor.
        for ref in refs:
            if dedupe and ref.qualname in self._seen_globals:
                continue
            self._seen_globals.add(ref.qualname)
            self.globals.append(ref)

    def _bytes_item(self, fqn: str, where: _Stored) -> Any:
        path = self._data_file(fqn, where)
        label = f"{where.relative_path}@{where.offset}"
        if where.transformed or where.length > MAX_BYTES_ITEM:
            self.warnings.append(
                f"{self.folder}: non-tensor item '{fqn}' ({label}, {where.length} bytes) is not read"
            )
            return Placeholder("torch.distributed.checkpoint", "unread_bytes_item", (fqn,))
        with open(path, "rb") as f:
            f.seek(where.offset)
            head = f.read(min(where.length, len(_ZIP_MAGIC)))
            if head == _ZIP_MAGIC:
                return self._embedded(path, f, where, fqn, tensor=False)
            f.seek(where.offset)
            data = f.read(where.length)
        if data[:1] == b"\x80":
            root, refs, warnings = inert_load(data, display=str(self.folder), source=f"{label} ({fqn})")
            self._record(refs, dedupe=False)
            self.warnings.extend(warnings)
            return root
        return data


def _resolver(path: Path, label: str, prefix: str, entries: dict[str, ZipEntry]) -> StorageResolver:
    def resolve(key: str, dtype: str, expected_nbytes: int) -> StorageRef:
        entry = entries.get(f"{prefix}data/{key}")
        if entry is None:
            raise InputError(
                f"{path}: the archive at '{label}' refers to storage '{key}' but has no entry for it; "
                "the file is corrupt — re-save the checkpoint"
            )
        return StorageRef(
            path, f"{label}/{entry.name}", entry.data_offset, entry.size, dtype, compressed=entry.compressed
        )

    return resolve


def _valid_path(value: Any) -> tuple[str | int, ...] | None:
    if not isinstance(value, tuple | list) or not value:
        return None
    if not all(isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool)) for p in value):
        return None
    return tuple(value)


def _fallback_path(fqn: str) -> tuple[str, ...]:
    head, dot, rest = fqn.partition(".")
    return (head, rest) if dot and rest and head in KNOWN_TOP_KEYS else (fqn,)


def unflatten(flat: dict[str, Any], planner_data: Any, warnings: list[str], folder: Path) -> dict[Any, Any]:
    """Rebuild the nested dict DCP flattened (``model.layer1.bn.running_mean`` -> ``{"model": {...}}``).

    ``planner_data`` (FQN -> key path, written by DCP's default planner) gives the exact nesting; without it
    only well-known top-level keys (``model``, ``state_dict``, ...) are split off.

    Args:
        flat: FQN -> value, in the metadata's order.
        planner_data: the metadata's ``planner_data``, or anything else when absent.
        warnings: collects a note for each FQN kept flat because its path clashes.
        folder: the checkpoint, for messages.

    Returns:
        The nested container (lists come back as dicts keyed by index).
    """
    mapping = planner_data if isinstance(planner_data, Mapping) else {}
    root: dict[Any, Any] = {}
    for fqn, value in flat.items():
        path = _valid_path(mapping.get(fqn)) or _fallback_path(fqn)
        node: Any = root
        for part in path[:-1]:
            child = node.setdefault(part, {}) if isinstance(node, dict) else None
            node = child
        if not isinstance(node, dict) or path[-1] in node:
            warnings.append(f"{folder}: item '{fqn}' clashes with another item's key path; kept at the top")
            root[fqn] = value
            continue
        node[path[-1]] = value
    return root


def _foreign_globals(refs: list[GlobalRef]) -> bool:
    return any(not ref.module.startswith("torch.distributed.checkpoint") for ref in refs)


def read_dcp(folder: Path) -> Checkpoint:
    """Read a torch.distributed.checkpoint folder without executing anything in it.

    The ``.metadata`` pickle (which ``torch.distributed.checkpoint.load`` reads with plain ``pickle``) goes
    through the inert unpickler, and so does every embedded ``torch.save`` archive and non-tensor item
    (which DCP's loader reads with ``torch.load(weights_only=False)``): their globals are recorded for the
    security audit. Tensors become lazy references into the ``*.distcp`` files; no tensor data is read.

    Args:
        folder: the directory holding ``.metadata`` and the ``*.distcp`` files.

    Returns:
        A Checkpoint (format ``dcp``) whose root is the saved dict rebuilt from the flattened keys.

    Raises:
        InputError: the metadata is corrupt, or names data files or ranges that are missing.
    """
    meta_path = folder / METADATA_FILE
    size = meta_path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise InputError(
            f"{folder}: {METADATA_FILE} is {size} bytes, over the {MAX_PICKLE_BYTES} byte limit for a "
            "pickle; it is not DCP metadata"
        )
    with open(meta_path, "rb") as f:
        meta_root, refs, warnings = inert_load(f, display=str(folder), source=METADATA_FILE)
    reader = _DcpReader(folder, list(refs), list(warnings))
    try:
        try:
            meta = reader.metadata(meta_root)
        except InputError as exc:
            if not _foreign_globals(refs):
                raise
            # Not DCP metadata but a pickle that imports other things (a payload): hand it to the security
            # audit instead of stopping at "corrupt", so the gate reports what it would run.
            reader.warnings.append(str(exc))
            return Checkpoint(folder, "dcp", {}, [], globals=reader.globals, warnings=reader.warnings)
        flat = {fqn: reader.item(fqn, entry, meta) for fqn, entry in meta.items.items()}
    except BnauditError:
        raise
    except OSError as exc:
        raise InputError(
            f"{folder}: cannot read a data file ({exc.strerror or exc}); check the folder"
        ) from None
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as exc:
        raise InputError(
            f"{folder}: {METADATA_FILE} is corrupt ({type(exc).__name__}: {exc}); re-save the checkpoint"
        ) from None
    root = unflatten(flat, meta.planner_data, reader.warnings, folder)
    return Checkpoint(
        path=folder, format="dcp", root=root, state_dicts=[], globals=reader.globals, warnings=reader.warnings
    )
