"""Reader for torch.distributed.checkpoint (DCP) folders: inert ``.metadata``, lazy ``*.distcp`` tensors."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from bnaudit.checkpoint.bytesource import close, open_read, read_at
from bnaudit.checkpoint.dcp_bytes import scan_bytes_item
from bnaudit.checkpoint.dcp_metadata import (
    CONVERT,
    METADATA_FILE,
    DcpMetadata,
    StoredItem,
    contiguous_strides,
    foreign_globals,
    parse_metadata,
    placeholder_fields,
    read_metadata_pickle,
    tensor_dtype,
    unflatten,
)
from bnaudit.checkpoint.other_pickles import globals_of
from bnaudit.checkpoint.remote_folder import dcp_folder, member_size
from bnaudit.checkpoint.torchzip import read_archive, storage_resolver
from bnaudit.checkpoint.types import (
    ITEMSIZE,
    Checkpoint,
    ChunkedTensor,
    ContainerFormat,
    GlobalRef,
    Placeholder,
    RefusedTensor,
    StorageRef,
    TensorRef,
)
from bnaudit.checkpoint.unpickler import MAX_PICKLE_BYTES, inert_load
from bnaudit.checkpoint.unpickler_globals import int_tuple, summary
from bnaudit.checkpoint.zipdir import LOCAL_SIGNATURE
from bnaudit.errors import InputError

# A non-tensor item that is not a pickle is kept as raw bytes up to this size (pickles: scanned at any size).
MAX_BYTES_ITEM = 64 << 20


class _DcpReader:
    """Turns one DCP folder's metadata into a nested container of lazy tensors and inert objects."""

    def __init__(self, folder: Path, globals_: list[GlobalRef], warnings: list[str]) -> None:
        self.folder = folder
        self.globals = globals_
        self.warnings = warnings
        self._seen_globals = {g.qualname for g in globals_}
        self._sizes: dict[str, int] = {}
        self.ambiguities: list[str] = []  # embedded archives torch and zipfile would read apart

    def item(self, fqn: str, entry: Any, meta: DcpMetadata) -> Any:
        """The lazy tensor or inert object stored under ``fqn``."""
        if isinstance(entry, Placeholder) and entry.name == "BytesStorageMetadata":
            where = meta.storage.get((fqn, None))
            if where is None:
                raise self._missing(fqn, None)
            return self._bytes_item(fqn, where)
        fields = placeholder_fields(entry)
        if not (isinstance(entry, Placeholder) and entry.name == "TensorStorageMetadata" and fields):
            self.warnings.append(
                f"{self.folder}: item '{fqn}' has unknown metadata {type(entry).__name__}; it is skipped"
            )
            return entry
        return self._tensor_item(fqn, fields, meta)

    def _tensor_item(self, fqn: str, fields: dict[str, Any], meta: DcpMetadata) -> TensorRef:
        dtype, shape = tensor_dtype(self.folder, fqn, fields.get("properties")), int_tuple(fields.get("size"))
        chunks = fields.get("chunks")
        if shape is None or not isinstance(chunks, list) or not chunks:
            raise InputError(
                f"{METADATA_FILE} describes tensor '{fqn}' without a valid size and chunks; it is corrupt",
                path=self.folder,
                fix="re-save the checkpoint",
            )
        parts = []
        for chunk in chunks:
            cf = placeholder_fields(chunk) or {}
            offsets, sizes = int_tuple(cf.get("offsets")), int_tuple(cf.get("sizes"))
            if offsets is None or sizes is None or len(offsets) != len(shape) or len(sizes) != len(shape):
                raise InputError(
                    "tensor '{}' has a chunk with invalid offsets or sizes ({}, {}); {} is corrupt".format(
                        fqn, summary(cf.get("offsets")), summary(cf.get("sizes")), METADATA_FILE
                    ),
                    path=self.folder,
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
        item = StorageRef(self.folder / METADATA_FILE, fqn, 0, 0, dtype)
        location = ChunkedTensor(item, tuple(parts), f"{self.folder}: '{fqn}'")
        return TensorRef(location, dtype, shape, contiguous_strides(shape))

    def _missing(self, fqn: str, offsets: tuple[int, ...] | None) -> InputError:
        at = "" if offsets is None else f" (chunk at {list(offsets)})"
        return InputError(
            f"item '{fqn}'{at} is listed in {METADATA_FILE} but has no storage_data entry; the checkpoint is "
            "incomplete or corrupt",
            path=self.folder,
            fix="re-save it",
        )

    def _data_file(self, fqn: str, where: StoredItem) -> Path:
        # File names come from an untrusted pickle: keep them inside the folder.
        name = where.relative_path
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise InputError(
                f"item '{fqn}' names data file {name!r}, which is not a file inside the folder",
                path=self.folder,
                fix=f"{METADATA_FILE} is corrupt or crafted",
            )
        path = self.folder / pure
        size = self._sizes.get(name)
        if size is None:
            size = member_size(self.folder, path)
            if size is None:
                raise InputError(
                    f"data file '{name}' (holding '{fqn}') is missing",
                    path=self.folder,
                    fix="copy every *.distcp file of the checkpoint",
                )
            self._sizes[name] = size
        if where.offset + where.length > size:
            raise InputError(
                f"item '{fqn}' spans bytes {where.offset}..{where.offset + where.length} of '{name}', which "
                f"has {size} bytes; the file is truncated",
                path=self.folder,
                fix="copy it again",
            )
        return path

    def _chunk(self, fqn: str, where: StoredItem, dtype: str, shape: tuple[int, ...]) -> TensorRef:
        path = self._data_file(fqn, where)
        if where.transformed:
            return self._refused(
                path, where, dtype, shape, f"'{fqn}' is stored with DCP transforms (e.g. compression)"
            )
        if read_at(path, len(LOCAL_SIGNATURE), where.offset) == LOCAL_SIGNATURE:
            found = self._embedded(path, where, fqn, tensor=True)
            return self._check_chunk(path, where, fqn, found, dtype, shape)
        numel = 1
        for size in shape:
            numel *= size
        if where.length != numel * ITEMSIZE[dtype]:
            raise InputError(
                f"'{fqn}' in '{where.relative_path}' at byte {where.offset} is neither a torch.save archive "
                f"nor {numel * ITEMSIZE[dtype]} raw bytes of {dtype} (found {where.length} bytes); the file "
                "is corrupt",
                path=self.folder,
                fix="re-save the checkpoint",
            )
        storage = StorageRef(path, where.label, where.offset, where.length, dtype)
        return TensorRef(storage, dtype, shape, contiguous_strides(shape))

    def _refused(
        self, path: Path, where: StoredItem, dtype: str, shape: tuple[int, ...], why: str
    ) -> TensorRef:
        location = RefusedTensor(StorageRef(path, where.label, 0, 0, dtype), str(self.folder), why, CONVERT)
        self.warnings.append(f"{self.folder}: {why}, which bnaudit does not read; {CONVERT}")
        return TensorRef(location, dtype, shape, contiguous_strides(shape))

    def _check_chunk(
        self, path: Path, where: StoredItem, fqn: str, found: Any, dtype: str, shape: tuple[int, ...]
    ) -> TensorRef:
        if isinstance(found, TensorRef) and found.storage.compressed:
            return self._refused(path, where, dtype, shape, f"'{fqn}' is stored deflated")
        if not isinstance(found, TensorRef):
            return self._refused(path, where, dtype, shape, f"'{fqn}' is not a plain tensor archive")
        if found.shape != shape or found.dtype != dtype:
            raise InputError(
                f"'{fqn}' in '{where.label}' is a {found.dtype} tensor of shape {list(found.shape)} but "
                f"{METADATA_FILE} says {dtype} {list(shape)}; the checkpoint is corrupt",
                path=self.folder,
                fix="re-save it",
            )
        return found

    def _embedded(self, path: Path, where: StoredItem, fqn: str, tensor: bool) -> Any:
        """Inertly load the torch.save archive DCP embedded at ``where``; its storages stay lazy."""
        fd = open_read(path)
        try:
            window = (where.offset, where.offset + where.length)
            archive = read_archive(path, fd, window, min(MAX_PICKLE_BYTES, MAX_BYTES_ITEM))
        except InputError as exc:
            f = exc.fields
            raise InputError(
                f.problem, path=self.folder, where=f"'{fqn}' in '{where.label}'", expected=f.expected,
                found=f.found, fix=f.fix,
            ) from None  # fmt: skip
        finally:
            close(fd)
        resolver = storage_resolver(path, archive, where.label)
        source = f"{where.label}/{archive.pickle_name}"
        root, refs, warnings = inert_load(
            archive.pickle, display=str(self.folder), source=source, resolver=resolver
        )
        self._record([*refs, *globals_of(archive.other_pickles, str(self.folder))], dedupe=tensor)
        self.warnings.extend(w for w in warnings if w not in self.warnings)
        self.ambiguities.extend(f"'{fqn}' in '{where.label}': {a}" for a in archive.ambiguities)
        return root

    def _record(self, refs: list[GlobalRef], dedupe: bool) -> None:
        # Every tensor of a DCP checkpoint is its own small torch.save archive: record each global once,
        # with the first archive naming it, so a listing does not repeat the tensor machinery per tensor.
        for ref in refs:
            if dedupe and ref.qualname in self._seen_globals:
                continue
            self._seen_globals.add(ref.qualname)
            self.globals.append(ref)

    def _bytes_item(self, fqn: str, where: StoredItem) -> Any:
        path = self._data_file(fqn, where)
        if where.transformed:
            self.warnings.append(
                f"{self.folder}: non-tensor item '{fqn}' ({where.label}, {where.length} bytes) is stored "
                "transformed (compressed) and is not read"
            )
            return Placeholder("torch.distributed.checkpoint", "unread_bytes_item", (fqn,))
        if read_at(path, len(LOCAL_SIGNATURE), where.offset) == LOCAL_SIGNATURE:
            return self._embedded(path, where, fqn, tensor=False)
        # dcp.load torch.loads every byte item, whatever its first byte and size: scan it as torch reads it.
        label = f"{where.label} ({fqn})"
        pickled, root, refs, warnings = scan_bytes_item(
            path, where.offset, where.length, display=str(self.folder), source=label
        )
        self._record(refs, dedupe=False)
        self.warnings.extend(warnings)
        if pickled:
            return root
        if where.length > MAX_BYTES_ITEM:
            return Placeholder("torch.distributed.checkpoint", "unread_bytes_item", (fqn,))
        return read_at(path, where.length, where.offset)


def read_dcp(folder: Path) -> Checkpoint:
    """Read a torch.distributed.checkpoint folder without executing anything in it.

    The ``.metadata`` pickle (read by dcp.load with plain ``pickle``), every embedded ``torch.save`` archive
    and non-tensor item (``torch.load(weights_only=False)`` there) go through the inert unpickler: their
    globals are recorded for the audit. Tensors are lazy references into the ``*.distcp`` files.

    Args:
        folder: the folder holding ``.metadata`` and the ``*.distcp`` files; a URL (a ``.metadata`` URL names
            its folder: :mod:`bnaudit.checkpoint.remote_folder`).

    Returns:
        A Checkpoint (format ``dcp``) whose root is the saved dict rebuilt from the flattened keys.

    Raises:
        InputError: the metadata is corrupt, or names data files or ranges that are missing.
    """
    folder = dcp_folder(folder)
    meta_root, refs, warnings = read_metadata_pickle(folder)
    reader = _DcpReader(folder, list(refs), list(warnings))
    try:
        try:
            meta = parse_metadata(folder, meta_root)
        except InputError as exc:
            if not foreign_globals(refs):
                raise
            # Not DCP metadata but a pickle that imports other things (a payload): hand it to the security
            # audit instead of stopping at "corrupt", so the gate reports what it would run.
            reader.warnings.append(str(exc))
            return Checkpoint(folder, ContainerFormat.DCP, {}, [], reader.globals, warnings=reader.warnings)
        flat = {fqn: reader.item(fqn, entry, meta) for fqn, entry in meta.items.items()}
    # No BnauditError is an OSError, nor (DtypeOverflowError aside, which only writing raises) one of the
    # errors below: the reader's own errors pass through untouched.
    except OSError as exc:
        raise InputError(
            f"cannot read a data file ({exc.strerror or exc})", path=folder, fix="check the folder"
        ) from None
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as exc:
        raise InputError(
            f"{METADATA_FILE} is corrupt ({type(exc).__name__}: {exc})",
            path=folder,
            fix="re-save the checkpoint",
        ) from None
    root = unflatten(flat, meta.planner_data, reader.warnings, folder)
    return Checkpoint(
        folder, ContainerFormat.DCP, root, [], reader.globals, warnings=reader.warnings,
        ambiguities=reader.ambiguities,
    )  # fmt: skip
