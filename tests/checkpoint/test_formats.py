"""The format registry (bnaudit.checkpoint.formats) and tensor reading dispatched on a tensor's location."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnaudit.checkpoint import detect_format, load_checkpoint
from bnaudit.checkpoint.formats import FORMAT_SPECS, FormatFamily, format_spec
from bnaudit.checkpoint.tensors import read_tensor, read_tensors
from bnaudit.checkpoint.types import (
    Checkpoint,
    ChunkedTensor,
    ContainerFormat,
    RefusedTensor,
    StorageRef,
    TensorRef,
)
from bnaudit.checkpoint.writer import TensorPatch, write_patched
from bnaudit.errors import InputError, UnsupportedFormatError

# The strings reports print: the registry must not change them.
REPORTED = {"torch-zip", "torch-legacy", "torch-tar", "pickle", "safetensors", "hf-sharded", "dcp"}


def test_every_format_has_one_spec_with_a_reader() -> None:
    assert {f.value for f in ContainerFormat} == REPORTED
    assert set(FORMAT_SPECS) == set(ContainerFormat)
    for fmt, spec in FORMAT_SPECS.items():
        assert spec.format is fmt and callable(spec.reader) and spec.notes
        assert format_spec(fmt.value) is spec


def test_patchable_specs_have_fixups_and_a_family_to_write() -> None:
    patchable = {f for f, s in FORMAT_SPECS.items() if s.patchable}
    assert patchable == {ContainerFormat.TORCH_ZIP, ContainerFormat.TORCH_LEGACY, ContainerFormat.SAFETENSORS}
    for fmt in patchable:
        fixups = format_spec(fmt).fixups
        assert fixups is not None
        assert all(callable(getattr(fixups, name)) for name in ("plan", "apply", "problem"))
        assert format_spec(fmt).family is not FormatFamily.OTHER
    assert format_spec("safetensors").family.value == "safetensors"
    assert format_spec("torch-zip").family.value == format_spec("torch-legacy").family.value == "pt"


@pytest.mark.parametrize("fmt", [f for f, s in FORMAT_SPECS.items() if not s.patchable], ids=str)
def test_writer_refuses_a_format_it_cannot_patch(tmp_path: Path, fmt: ContainerFormat) -> None:
    ckpt = Checkpoint(tmp_path / "in", fmt, {}, [])
    ref = TensorRef(StorageRef(tmp_path / "in", "k", 0, 8, "float64"), "float64", (1,), (1,))
    with pytest.raises(UnsupportedFormatError, match="cannot be written by bnaudit") as exc:
        write_patched(ckpt, [TensorPatch("", "k", ref, np.zeros(1))], tmp_path / "out")
    assert exc.value.fields.path == str(tmp_path / "in")
    assert not (tmp_path / "out").exists()


def test_detection_and_loading_go_through_the_registry(tmp_path: Path) -> None:
    files = {
        ContainerFormat.TORCH_ZIP: tmp_path / "a.pt",
        ContainerFormat.TORCH_LEGACY: tmp_path / "b.pt",
        ContainerFormat.SAFETENSORS: tmp_path / "c.safetensors",
        ContainerFormat.PICKLE: tmp_path / "d.pkl",
    }
    sd = {"bn.running_mean": torch.arange(3.0)}
    torch.save(sd, files[ContainerFormat.TORCH_ZIP])
    torch.save(sd, files[ContainerFormat.TORCH_LEGACY], _use_new_zipfile_serialization=False)
    save_file(sd, files[ContainerFormat.SAFETENSORS])
    files[ContainerFormat.PICKLE].write_bytes(pickle.dumps({"a": 1}))
    for fmt, path in files.items():
        detected = detect_format(path)
        assert isinstance(detected, ContainerFormat) and detected is fmt
        ckpt = load_checkpoint(path)
        assert ckpt.format is fmt and str(ckpt.format) == fmt.value and f"{ckpt.format}" == fmt.value


# ------------------------------------------------------------------------------ reading by location


def test_a_storage_location_reads_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "raw"
    path.write_bytes(b"\xff" * 8 + np.arange(4, dtype="<f4").tobytes())
    ref = TensorRef(StorageRef(path, "s", 8, 16, "float32"), "float32", (2,), (2,), offset=1)
    np.testing.assert_array_equal(read_tensor(ref), [1.0, 3.0])


def test_a_compressed_storage_location_is_inflated(tmp_path: Path) -> None:
    path = tmp_path / "z.zip"
    values = np.arange(64, dtype="<f8")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data/0", values.tobytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
    data_offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
    storage = StorageRef(path, "archive/data/0", data_offset, 64 * 8, "float64", compressed=True)
    np.testing.assert_array_equal(read_tensor(TensorRef(storage, "float64", (64,), (1,))), values)
    np.testing.assert_array_equal(read_tensor(TensorRef(storage, "float64", (3,), (1,), offset=5)), [5, 6, 7])


def test_a_chunked_location_is_assembled_and_a_refused_one_says_why(tmp_path: Path) -> None:
    path = tmp_path / "raw"
    path.write_bytes(np.arange(6, dtype="<f8").tobytes())
    chunks = tuple(
        ((o,), TensorRef(StorageRef(path, str(o), 8 * o, 8 * n, "float64"), "float64", (n,), (1,)))
        for o, n in ((3, 3), (0, 3))
    )
    item = StorageRef(path, "w", 0, 0, "float64")
    whole = TensorRef(ChunkedTensor(item, chunks, "w"), "float64", (6,), (1,))
    refused = TensorRef(RefusedTensor(item, "w", "stored deflated", "convert it"), "float64", (6,), (1,))
    plain = chunks[0][1]
    assert whole.storage is item and plain.storage is plain.location
    got = read_tensors([whole, plain])
    np.testing.assert_array_equal(got[0], np.arange(6.0))
    np.testing.assert_array_equal(got[1], [3.0, 4.0, 5.0])
    with pytest.raises(InputError, match="stored deflated"):
        read_tensor(refused)
    with pytest.raises(InputError, match="exactly once"):
        read_tensor(TensorRef(ChunkedTensor(item, chunks[:1], "w"), "float64", (6,), (1,)))
