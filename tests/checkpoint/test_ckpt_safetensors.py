"""safetensors files and Hugging Face sharded indexes read lazily and match what was saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import assert_same_tensor
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from bnaudit.checkpoint import TensorRef, detect_format, load_checkpoint
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.errors import InputError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.running_var": torch.rand(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(5),
        "half": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "e4m3": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "empty": torch.zeros(0, 4),
    }


def test_torch_written_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_torch(tensors, path, metadata={"format": "pt"})
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.metadata == {"format": "pt"}
    assert [s.name for s in ckpt.state_dicts] == [""]
    assert set(ckpt.root) == set(tensors)
    for name, t in tensors.items():
        assert_same_tensor(ckpt.root[name], t, name)


def test_numpy_written_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "np.safetensors"
    arrays: dict[str, np.ndarray] = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, -2], dtype=np.int64),
        "c": np.array(3.5, dtype=np.float64),
        "d": np.arange(4, dtype=np.uint16),
    }
    save_numpy(arrays, str(path))
    root = load_checkpoint(path).root
    for name, a in arrays.items():
        got = read_tensor(root[name])
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


def test_header_order_and_offsets(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_torch({"z": torch.ones(3), "a": torch.zeros(2)}, path)
    root = load_checkpoint(path).root
    ref: TensorRef = root["z"]
    raw = path.read_bytes()[ref.storage.file_offset : ref.storage.file_offset + ref.storage.nbytes]
    assert np.frombuffer(raw, "<f4").tolist() == [1.0, 1.0, 1.0]


def _shard(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tensors()
    del tensors["e4m3"], tensors["e5m2"]  # keep the .bin shards loadable by every torch
    names = list(tensors)
    shards = {f"model-0000{i + 1}-of-00002.{fmt}": names[i::2] for i in range(2)}
    weight_map = {}
    for shard, keys in shards.items():
        part = {k: tensors[k].contiguous() for k in keys}
        if fmt == "safetensors":
            save_torch(part, tmp_path / shard)
        else:
            torch.save(part, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    index = tmp_path / f"model.{fmt}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return index, tensors


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_index(tmp_path: Path, fmt: str) -> None:
    index, tensors = _shard(tmp_path, fmt)
    assert detect_format(index) == "hf-sharded"
    ckpt = load_checkpoint(index)
    assert ckpt.format == "hf-sharded" and ckpt.metadata == {"total_size": "123"}
    assert [s.name for s in ckpt.state_dicts] == [""]
    assert set(ckpt.root) == set(tensors)
    assert len({t.storage.path for t in ckpt.root.values()}) == 2
    for name, t in tensors.items():
        assert_same_tensor(ckpt.root[name], t, name)


def test_sharded_missing_shard(tmp_path: Path) -> None:
    index, _ = _shard(tmp_path, "safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match=r"model-00002-of-00002\.safetensors.*missing"):
        load_checkpoint(index)


def test_sharded_key_missing_from_shard(tmp_path: Path) -> None:
    index, _ = _shard(tmp_path, "safetensors")
    data = json.loads(index.read_text())
    data["weight_map"]["not.there"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"'not\.there'.*model-00001-of-00002\.safetensors") as err:
        load_checkpoint(index)
    assert "\n" not in str(err.value)


def test_sharded_rejects_paths_outside_the_folder(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(InputError, match="relative"):
        load_checkpoint(index)
