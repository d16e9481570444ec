"""Unreadable input fails with one InputError line naming the file, never a traceback from deep inside."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from ckpt_helpers import entry_name, rewrite_zip
from safetensors.torch import save_file

from bnaudit.checkpoint import detect_format, load_checkpoint
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.errors import InputError, UnsupportedFormatError


def _fails(path: Path, *fragments: str, exc: type[Exception] = InputError) -> str:
    with pytest.raises(exc) as err:
        ckpt = load_checkpoint(path)
        for sd in ckpt.state_dicts:
            for t in sd.tensors.values():
                read_tensor(t)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _saved(tmp_path: Path, **kwargs: bool) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save({"bn.running_mean": torch.arange(256.0), "bn.running_var": torch.ones(256)}, path, **kwargs)
    return path


def test_missing_file(tmp_path: Path) -> None:
    _fails(tmp_path / "nope.pt", "no such file")


def test_directory_without_metadata(tmp_path: Path) -> None:
    _fails(tmp_path, "directory")


def test_dcp_directory_with_corrupt_metadata(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(b"x")
    assert detect_format(tmp_path) == "dcp"
    _fails(tmp_path, ".metadata", "corrupt")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    _fails(path, "empty")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello, this is not a checkpoint\n")
    _fails(path, "text file")


def test_json_without_weight_map(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 3}))
    _fails(path, "weight_map")


def test_truncated_zip(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails(path, "truncated")


def test_truncated_legacy(tmp_path: Path) -> None:
    path = _saved(tmp_path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _fails(path, "truncated")


def test_truncated_legacy_pickle(tmp_path: Path) -> None:
    path = _saved(tmp_path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])
    _fails(path, "corrupt or truncated")


def test_truncated_plain_pickle(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": list(range(100)), "b": "x" * 100}, protocol=4)[:-40])
    assert detect_format(path) == "pickle"
    _fails(path, "pickle is corrupt or truncated")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))), path
    )
    _fails(path, "TorchScript", "state_dict()", exc=UnsupportedFormatError)


def test_storage_shorter_than_shape(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    short = tmp_path / "short.pt"
    rewrite_zip(path, short, {entry_name(path, "/data/0"): b"\x00" * 512})
    message = _fails(short, "512 bytes", "needs 1024", "data/0")
    assert "re-save" in message


def test_missing_storage_entry(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    broken = tmp_path / "broken.pt"
    rewrite_zip(path, broken, {entry_name(path, "/data/1"): None})
    _fails(broken, "data/1", "missing")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    broken = tmp_path / "nopkl.pt"
    rewrite_zip(path, broken, {entry_name(path, "/data.pkl"): None})
    _fails(broken, "data.pkl")


def _safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(4.0), "b": torch.ones(2, 3)}, path)
    return path


def _rewrite_header(path: Path, header: object) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def test_safetensors_header_length_too_large(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)
    path.write_bytes(bytes(data))
    _fails(path, "header length")


def test_safetensors_bad_json(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    data = bytearray(path.read_bytes())
    data[9:14] = b"#####"
    path.write_bytes(bytes(data))
    _fails(path, "not valid JSON")


def test_safetensors_offsets_out_of_range(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    _rewrite_header(
        path,
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [16, 4000]},
        },
    )
    _fails(path, "'b'", "data_offsets")


def test_safetensors_size_inconsistent_with_shape(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    _rewrite_header(path, {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}})
    _fails(path, "'a'", "needs 20")


def test_safetensors_overlap(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    _rewrite_header(
        path,
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        },
    )
    _fails(path, "overlap")


def test_safetensors_unknown_dtype(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    _rewrite_header(path, {"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}})
    _fails(path, "'a'", "dtype")


def test_unknown_binary(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 4)
    _fails(path, "unknown format")
