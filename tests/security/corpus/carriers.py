"""Where a payload travels: a real torch.save checkpoint with a BatchNorm state dict, whose pickle gets the
payload spliced in front of its real content (so the file still loads as a checkpoint after the payload ran).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tests.security.corpus.ops import POP


def bn_state() -> OrderedDict[str, Any]:
    """A small conv + BatchNorm state dict with trained-looking statistics (so the BN audit itself passes)."""
    import torch

    sd: OrderedDict[str, Any] = OrderedDict()
    sd["features.0.weight"] = torch.ones(4, 3, 1, 1)
    sd["features.1.weight"] = torch.linspace(0.5, 1.5, 4)
    sd["features.1.bias"] = torch.linspace(-0.1, 0.1, 4)
    sd["features.1.running_mean"] = torch.tensor([0.1, -0.2, 0.3, 0.05])
    sd["features.1.running_var"] = torch.tensor([0.9, 1.1, 1.3, 0.8])
    sd["features.1.num_batches_tracked"] = torch.tensor(120)
    return sd


def checkpoint_object() -> dict[str, Any]:
    return {"state_dict": bn_state(), "epoch": 3}


def save_torch(path: Path, obj: Any | None = None, **kwargs: Any) -> Path:
    import torch

    torch.save(checkpoint_object() if obj is None else obj, path, **kwargs)
    return path


def splice(pickle_bytes: bytes, payload: bytes) -> bytes:
    """``payload`` (opcodes pushing one object) run first, its result popped, then the original pickle."""
    if pickle_bytes[:1] == b"\x80":
        return pickle_bytes[:2] + payload + POP + pickle_bytes[2:]
    return payload + POP + pickle_bytes


def zip_members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A stored zip with the members in order (Python's zipfile writes each name exactly as given)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    return path


def data_pkl_name(members: list[tuple[str, bytes]]) -> str:
    return next(n for n, _ in members if n.endswith("/data.pkl"))


def torch_zip_with(path: Path, payload: bytes, protocol: int = 2) -> Path:
    """A real torch.save zip whose data.pkl runs ``payload`` before rebuilding the checkpoint."""
    save_torch(path, pickle_protocol=protocol)
    members = zip_members(path)
    name = data_pkl_name(members)
    return write_members(path, [(n, splice(d, payload) if n == name else d) for n, d in members])


def replace_data_pkl(path: Path, data: bytes) -> Path:
    """A real torch.save zip whose data.pkl is ``data`` verbatim."""
    save_torch(path)
    members = zip_members(path)
    name = data_pkl_name(members)
    return write_members(path, [(n, data if n == name else d) for n, d in members])


def pickle_spans(data: bytes, count: int) -> list[tuple[int, int]]:
    """The byte spans of the first ``count`` pickles concatenated in ``data`` (read with pickletools, inert)."""
    spans, start = [], 0
    for _ in range(count):
        end = start
        for op, _arg, pos in pickletools.genops(io.BytesIO(data[start:])):
            if op.name == "STOP":
                end = start + pos + 1
                break
        spans.append((start, end))
        start = end
    return spans


def legacy_with(path: Path, payload: bytes, index: int) -> Path:
    """A real legacy (``_use_new_zipfile_serialization=False``) file with ``payload`` spliced into its
    ``index``-th pickle: 0 magic number, 1 protocol version, 2 sys info, 3 the object, 4 storage keys."""
    save_torch(path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    start, end = pickle_spans(data, index + 1)[index]
    path.write_bytes(data[:start] + splice(data[start:end], payload) + data[end:])
    return path
