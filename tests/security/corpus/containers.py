"""Pickles torch.load (or dcp.load) unpickles outside the obvious place: the legacy format's five pickles,
the pre-1.0 tar format, protocol 0 and 1 opcodes, plain pickle files, and DCP's non-tensor items."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

from tests.security.corpus.carriers import legacy_with, pickle_spans, replace_data_pkl, save_torch, splice
from tests.security.corpus.dcp_helpers import redirect_bytes_item, save_dcp
from tests.security.corpus.ops import MARK, STOP, glob, system_call, text, touch_command, whole
from tests.security.corpus.registry import case

SYSTEM = ("os.system", "posix.system")
LEGACY_PICKLES = {0: "magic-number", 1: "protocol-version", 2: "sys-info", 3: "object", 4: "storage-keys"}


def _legacy_case(index: int, label: str) -> None:
    def build(folder: Path, m: str) -> Path:
        return legacy_with(folder / f"legacy-{label}.pt", system_call(m), index)

    case(f"legacy:{label}-pickle", "container", SYSTEM)(build)


for _index, _label in LEGACY_PICKLES.items():
    _legacy_case(_index, _label)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def _tar_members(m: str, where: str) -> dict[str, bytes]:
    """The pre-1.0 layout: ``storages`` (count, then records), ``tensors`` (count), ``pickle`` (the object);
    the payload goes in front of the first pickle of member ``where``."""
    zero, empty = pickle.dumps(0, protocol=2), pickle.dumps([], protocol=2)
    members = {"storages": zero + empty, "tensors": zero, "pickle": pickle.dumps({"epoch": 3}, protocol=2)}
    _start, end = pickle_spans(members[where], 1)[0]
    members[where] = splice(members[where][:end], system_call(m)) + members[where][end:]
    return members


@case("tar:storages-pickle", "container", SYSTEM)
def _tar_storages(folder: Path, m: str) -> Path:
    return _tar(folder / "tar-storages.pt", _tar_members(m, "storages"))


@case("tar:object-pickle", "container", SYSTEM)
def _tar_object(folder: Path, m: str) -> Path:
    return _tar(folder / "tar-object.pt", _tar_members(m, "pickle"))


@case("p0:INST-plain-file", "container", SYSTEM)
def _inst(folder: Path, m: str) -> Path:
    path = folder / "inst-p0.pkl"
    path.write_bytes(MARK + b"V" + touch_command(m).encode() + b"\nios\nsystem\n" + STOP)
    return path


@case("p1:OBJ-in-data.pkl", "container", SYSTEM)
def _obj(folder: Path, m: str) -> Path:
    payload = MARK + glob("os", "system") + text(touch_command(m)) + b"o"
    path = folder / "obj-p1.pt"
    save_torch(path)
    return _splice_data_pkl(path, payload)


def _splice_data_pkl(path: Path, payload: bytes) -> Path:
    from tests.security.corpus.carriers import data_pkl_name, write_members, zip_members

    members = zip_members(path)
    name = data_pkl_name(members)
    return write_members(path, [(n, splice(d, payload) if n == name else d) for n, d in members])


@case("plain-pickle:.bin-extension", "container", SYSTEM)
def _plain_bin(folder: Path, m: str) -> Path:
    path = folder / "pytorch_model.bin"
    path.write_bytes(whole(system_call(m), protocol=2))
    return path


@case("p0:GLOBAL-whole-data.pkl", "container", SYSTEM)
def _p0_data_pkl(folder: Path, m: str) -> Path:
    return replace_data_pkl(folder / "p0-data.pt", b"cos\nsystem\n(V" + touch_command(m).encode() + b"\ntR.")


@case("dcp:bytes-item-protocol-0", "container", SYSTEM, load="dcp")
def _dcp_p0(folder: Path, m: str) -> Path:
    item = b"cos\nsystem\n(V" + touch_command(m).encode() + b"\ntR."
    return redirect_bytes_item(save_dcp(folder / "dcp-item-p0"), item)


@case("dcp:bytes-item-torch-zip", "container", SYSTEM, load="dcp")
def _dcp_zip(folder: Path, m: str) -> Path:
    from tests.security.corpus.carriers import torch_zip_with

    inner = torch_zip_with(folder / "inner.tmp", system_call(m))
    item = inner.read_bytes()
    inner.unlink()
    return redirect_bytes_item(save_dcp(folder / "dcp-item-zip"), item)


@case("dcp:bytes-item-over-64MiB", "container", SYSTEM, load="dcp")
def _dcp_large(folder: Path, m: str) -> Path:
    # A protocol-0 payload, then padding past 64 MiB (a sparse hole): torch.load stops at the first STOP.
    item = b"cos\nsystem\n(V" + touch_command(m).encode() + b"\ntR."
    path = redirect_bytes_item(save_dcp(folder / "dcp-item-large"), item, length=(64 << 20) + 4096)
    return path
