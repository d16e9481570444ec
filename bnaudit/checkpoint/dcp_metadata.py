"""The ``.metadata`` of a torch.distributed.checkpoint folder, as rebuilt inertly: items, storage, nesting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.remote_folder import record_member
from bnaudit.checkpoint.types import ITEMSIZE, GlobalRef, Placeholder
from bnaudit.checkpoint.unpickler import inert_load_file
from bnaudit.checkpoint.unpickler_globals import DtypeMarker, int_tuple, summary
from bnaudit.errors import InputError

METADATA_FILE = ".metadata"
_META_MODULE = "torch.distributed.checkpoint.metadata"
# When .metadata carries no planner_data (old torch, custom planners), only these first FQN components are
# taken as the top-level keys of the saved dict; any other dotted key stays flat (a bare model state dict).
KNOWN_TOP_KEYS = frozenset(
    {"model", "state_dict", "model_ema", "state_dict_ema", "ema", "ema_model", "optim", "optimizer"}
)
CONVERT = "convert it with torch.distributed.checkpoint.format_utils.dcp_to_torch_save and audit the result"


def placeholder_fields(obj: Any) -> dict[str, Any] | None:
    """The attributes a pickled dataclass placeholder carries (its BUILD state and kwargs), or None."""
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


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides, in elements, of a C-contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def read_metadata_pickle(folder: Path) -> tuple[Any, list[GlobalRef], list[str]]:
    """The inertly rebuilt ``.metadata`` pickle: (object, globals referenced, warnings).

    Raises:
        InputError: the file is over the pickle size limit, or corrupt.
    """
    record_member(folder, folder / METADATA_FILE)
    return inert_load_file(folder / METADATA_FILE, where=METADATA_FILE, fix="it is not DCP metadata")


@dataclass(frozen=True)
class StoredItem:
    """Where one item (or chunk) lies: a ``_StorageInfo`` of the metadata."""

    relative_path: str
    offset: int
    length: int
    transformed: bool

    @property
    def label(self) -> str:
        """``file.distcp@offset``, as messages and storage keys name the item."""
        return f"{self.relative_path}@{self.offset}"


StorageKey = tuple[str, tuple[int, ...] | None]


@dataclass(frozen=True)
class DcpMetadata:
    """The parts of a ``Metadata`` object bnaudit uses."""

    items: dict[str, Any]  # FQN -> TensorStorageMetadata / BytesStorageMetadata placeholder
    storage: dict[StorageKey, StoredItem]
    planner_data: Any


def _storage_entry(folder: Path, index: Any, info: Any) -> tuple[StorageKey, StoredItem]:
    idx, where = placeholder_fields(index) or {}, placeholder_fields(info) or {}
    fqn, offset = idx.get("fqn"), idx.get("offset")
    rel, start, length = where.get("relative_path"), where.get("offset"), where.get("length")
    sizes_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, length))
    if not (isinstance(fqn, str) and isinstance(rel, str) and sizes_ok):
        raise InputError(
            f"{METADATA_FILE} has a storage_data entry without a file name, offset and length "
            f"({summary(fqn)}, {summary(rel)}, {summary(start)}, {summary(length)}); it is corrupt",
            path=folder,
            fix="re-save it",
        )
    assert isinstance(fqn, str) and isinstance(rel, str)
    assert isinstance(start, int) and isinstance(length, int)
    transformed = bool(where.get("transform_descriptors"))
    return (fqn, int_tuple(offset)), StoredItem(rel, start, length, transformed)


def parse_metadata(folder: Path, root: Any) -> DcpMetadata:
    """The items, storage places and planner data of the rebuilt ``Metadata`` object.

    Args:
        folder: the checkpoint, for messages.
        root: what the inert unpickler rebuilt from ``.metadata``.

    Returns:
        The DcpMetadata.

    Raises:
        InputError: ``root`` is not a DCP Metadata object, or lacks its mappings, or a storage entry is bad.
    """
    fields = placeholder_fields(root)
    if not (isinstance(root, Placeholder) and root.qualname == f"{_META_MODULE}.Metadata" and fields):
        found = root.qualname if isinstance(root, Placeholder) else type(root).__name__
        raise InputError(
            f"{METADATA_FILE} holds a {found}, not a torch.distributed.checkpoint Metadata object",
            path=folder,
            fix=f"the folder is not a DCP checkpoint or its {METADATA_FILE} is corrupt",
        )
    items, storage = fields.get("state_dict_metadata"), fields.get("storage_data")
    if not isinstance(items, Mapping) or not isinstance(storage, Mapping):
        raise InputError(
            f"{METADATA_FILE} lacks state_dict_metadata or storage_data mappings; it is corrupt or from an "
            "unknown DCP version",
            path=folder,
            fix=CONVERT,
        )
    stored = dict(_storage_entry(folder, index, info) for index, info in storage.items())
    named = {k: v for k, v in items.items() if isinstance(k, str)}
    return DcpMetadata(named, stored, fields.get("planner_data"))


def tensor_dtype(folder: Path, fqn: str, properties: Any) -> str:
    """The dtype a ``TensorProperties`` placeholder records (torch spelling).

    Raises:
        InputError: no torch dtype bnaudit reads.
    """
    # TensorProperties pickles as (dtype, layout, requires_grad, memory_format, pin_memory) in recent torch;
    # older versions pickled its __dict__.
    state = properties.state if isinstance(properties, Placeholder) else None
    fields = placeholder_fields(properties) or {}
    value = state[0] if isinstance(state, tuple) and state else fields.get("dtype")
    if isinstance(value, DtypeMarker) and value.name in ITEMSIZE:
        return value.name
    raise InputError(
        f"tensor '{fqn}' has dtype {summary(value)} in {METADATA_FILE}, not a torch dtype bnaudit reads",
        path=folder,
        fix=CONVERT,
    )


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


def foreign_globals(refs: Sequence[GlobalRef]) -> bool:
    """Whether a metadata pickle names globals outside torch.distributed.checkpoint (a payload's mark)."""
    return any(not ref.module.startswith("torch.distributed.checkpoint") for ref in refs)
