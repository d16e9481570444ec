"""The torch zip and legacy readers rebuild exactly the tensors torch.load does, without running torch."""

from __future__ import annotations

import argparse
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ckpt_helpers import assert_matches_torch, assert_same_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

from bnaudit.checkpoint import TensorRef, load_checkpoint
from bnaudit.checkpoint.unpickler_globals import DtypeMarker, InertOrderedDict, PlaceholderObject


class UserConfig:
    """A user class saved inside a checkpoint: the reader must not import it."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def _dtype_zoo() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    return {
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f32": base,
        "f64": base.double(),
        "i64": torch.arange(-6, 6),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "i16": torch.tensor([1, -2, 3], dtype=torch.int16),
    }


def _v3_dtypes() -> dict[str, torch.Tensor]:
    # dtypes without a typed storage class: saved with _rebuild_tensor_v3 over an UntypedStorage.
    g = torch.Generator().manual_seed(1)
    return {
        "e4m3": (torch.randn(7, generator=g) * 30).to(torch.float8_e4m3fn),
        "e5m2": (torch.randn(7, generator=g) * 1000).to(torch.float8_e5m2),
        "u16": torch.tensor([0, 1, 65535, 40000]).to(torch.uint16),
        "e4m3_2d_t": (torch.randn(3, 4, generator=g)).to(torch.float8_e4m3fn).t(),
    }


def _views() -> dict[str, torch.Tensor]:
    x = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    return {
        "base": x,
        "t": x.t(),
        "slice": x[1:, ::2],
        "row": x[3],
        "narrow": x.narrow(1, 2, 3),
        "expand": torch.ones(3, 1).expand(3, 4),
        "scalar_view": x[2, 5],
        "bf16_t": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(),
    }


def _module_sd() -> dict[str, Any]:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
        torch.nn.BatchNorm2d(4),
    )
    model.train()
    model(torch.randn(4, 3, 6, 6))
    return model.state_dict()


CASES: dict[str, Any] = {
    "dtypes": _dtype_zoo(),
    "v3_dtypes": _v3_dtypes(),
    "views": _views(),
    "empty_and_scalar": {
        "empty": torch.empty(0, 3),
        "empty1": torch.zeros(0),
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7),
    },
    "parameter": {
        "p": torch.nn.Parameter(torch.randn(3)),
        "p_nograd": torch.nn.Parameter(torch.ones(2), False),
    },
    "nested": {
        "a": [torch.ones(2), (torch.zeros(3), {"deep": torch.arange(4)})],
        "b": OrderedDict(x=torch.ones(1)),
    },
    "module_state_dict": _module_sd(),
    "user_class": {"cfg": UserConfig(0.1), "w": torch.ones(3), "ns": argparse.Namespace(a=1)},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_matches_torch_load(tmp_path: Path, name: str, zip_format: bool) -> None:
    if name == "v3_dtypes" and not zip_format:
        pytest.skip("torch.load itself cannot read UntypedStorage tensors from legacy files")
    path = tmp_path / "ckpt.pt"
    torch.save(CASES[name], path, _use_new_zipfile_serialization=zip_format)
    ckpt = assert_matches_torch(path)
    assert ckpt.format == ("torch-zip" if zip_format else "torch-legacy")
    assert ckpt.warnings == []


def test_parameter_requires_grad_recorded(tmp_path: Path) -> None:
    path = tmp_path / "p.pt"
    torch.save({"p": torch.nn.Parameter(torch.ones(2)), "b": torch.ones(2)}, path)
    root = load_checkpoint(path).root
    assert root["p"].requires_grad and not root["b"].requires_grad


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_shared_storage_is_one_storage(tmp_path: Path, zip_format: bool) -> None:
    x = torch.arange(12.0)
    path = tmp_path / "shared.pt"
    torch.save({"a": x, "b": x[4:].view(2, 4), "c": x[::3]}, path, _use_new_zipfile_serialization=zip_format)
    root = assert_matches_torch(path).root
    assert root["a"].storage.key == root["b"].storage.key == root["c"].storage.key
    assert root["b"].offset == 4 and root["c"].stride == (3,)


def test_state_dict_metadata_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    sd = _module_sd()
    torch.save(sd, path)
    root = load_checkpoint(path).root
    assert isinstance(root, InertOrderedDict)
    assert root.metadata == sd._metadata  # type: ignore[attr-defined]


def test_user_class_is_placeholder_with_state(tmp_path: Path) -> None:
    path = tmp_path / "user.pt"
    torch.save(CASES["user_class"], path)
    ckpt = load_checkpoint(path)
    cfg = ckpt.root["cfg"]
    assert isinstance(cfg, PlaceholderObject)
    assert cfg.qualname.endswith("UserConfig") and cfg.state == {"lr": 0.1}
    assert ckpt.root["ns"].qualname == "argparse.Namespace" and ckpt.root["ns"].state == {"a": 1}
    assert any(g.name == "UserConfig" for g in ckpt.globals)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "proto.pt"
    torch.save({"x": torch.arange(5.0), "blob": b"\x00\xffabc", "text": "é"}, path, pickle_protocol=protocol)
    ckpt = assert_matches_torch(path)
    assert ckpt.root["blob"] == b"\x00\xffabc" and ckpt.root["text"] == "é"


def test_archive_prefix_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "weird name.pt"
    torch.save({"x": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as zf:
        prefix = zf.namelist()[0].split("/")[0]
    root = load_checkpoint(path).root
    assert root["x"].storage.key == f"{prefix}/data/0"


def test_storage_offsets_are_absolute_file_offsets(tmp_path: Path) -> None:
    path = tmp_path / "off.pt"
    torch.save({"x": torch.arange(100, dtype=torch.float32)}, path)
    ref: TensorRef = load_checkpoint(path).root["x"]
    raw = path.read_bytes()[ref.storage.file_offset : ref.storage.file_offset + ref.storage.nbytes]
    assert np.array_equal(np.frombuffer(raw, "<f4"), np.arange(100, dtype=np.float32))
    assert ref.storage.file_offset % 64 == 0  # torch aligns storages to 64 bytes


def test_compressed_entry_is_read_and_flagged(tmp_path: Path) -> None:
    path, deflated = tmp_path / "plain.pt", tmp_path / "deflated.pt"
    x = torch.randn(3, 4)
    torch.save({"x": x, "y": x.t()}, path)
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    root = load_checkpoint(deflated).root
    assert root["x"].storage.compressed
    assert_same_tensor(root["x"], x)
    assert_same_tensor(root["y"], x.t())


dtypes = st.sampled_from(
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]
)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=dtypes,
    transpose=st.booleans(),
    step=st.integers(1, 3),
    start=st.integers(0, 2),
)
def test_random_views_match_torch(
    tmp_path_factory: Any, shape: list[int], dtype: torch.dtype, transpose: bool, step: int, start: int
) -> None:
    base = (torch.randn(*shape) * 10).to(dtype)
    view = base[start::step] if start < shape[0] else base
    if transpose and view.dim() > 1:
        view = view.transpose(0, -1)
    path = tmp_path_factory.mktemp("hyp") / "v.pt"
    torch.save({"base": base, "view": view}, path)
    assert_matches_torch(path)


def test_zip64_entries(tmp_path: Path) -> None:
    path, zip64 = tmp_path / "plain.pt", tmp_path / "zip64.pt"
    torch.save(CASES["views"], path)
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(zip64, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            with zout.open(info.filename, "w", force_zip64=True) as entry:
                entry.write(zin.read(info.filename))
    assert_matches_torch(zip64)


def test_plain_python_values_survive(tmp_path: Path) -> None:
    path = tmp_path / "values.pt"
    values = {
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "ba": bytearray(b"xy"),
        "c": 1 + 2j,
        "none": None,
        "t": (1, "a"),
    }
    torch.save(values, path)
    root = load_checkpoint(path).root
    assert root["size"] == (2, 3) and root["dtype"] == DtypeMarker("float16")
    assert isinstance(root["device"], PlaceholderObject) and root["device"].qualname == "torch.device"
    assert root["set"] == {1, 2} and root["frozen"] == frozenset({"a"}) and root["ba"] == bytearray(b"xy")
    assert root["c"] == 1 + 2j and root["none"] is None and root["t"] == (1, "a")
