"""Tensor decoding and encoding agree with torch; reading touches only the bytes it needs, without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnaudit.checkpoint import DtypeOverflowError, detect_format, encode_like, load_checkpoint, tensor_codec
from bnaudit.checkpoint import tensors as tensors_module
from bnaudit.checkpoint.tensors import read_tensor

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_fp8_table_matches_torch_for_every_code(dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    want = codes.view(dtype).to(torch.float64).numpy()
    got = tensor_codec.decode(codes.numpy(), str(dtype).removeprefix("torch."))
    np.testing.assert_array_equal(got, want)


def test_bfloat16_decode_matches_torch_for_every_code() -> None:
    codes = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(codes.view(np.int16).copy()).view(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(tensor_codec.decode(codes, "bfloat16"), want)


def _interesting_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    specials = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1e-40,
        -1e-45,
        5.96e-8,
        65504.0,
        65519.99,
        3.3e38,
        1.0 + 2**-8,
        1.0 + 2**-9,
        1.0 + 3 * 2**-9,
        1.00390625,
        1.01171875,
        np.nan,
        np.inf,
        -np.inf,
        1 / 3,
        2.0**-133,
        6e-5,
    ]
    return np.concatenate([specials, rng.normal(size=2000) * 10.0 ** rng.integers(-8, 8, size=2000)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_encode_like_matches_torch(dtype: str) -> None:
    values = _interesting_values()
    tdtype = getattr(torch, dtype)
    limit = float(torch.finfo(tdtype).max)
    values = values[~np.isfinite(values) | (np.abs(values) <= limit * 0.999)]
    want = torch.tensor(values, dtype=torch.float64).to(tdtype)
    raw_view = {
        "bfloat16": torch.int16,
        "float16": torch.int16,
        "float32": torch.int32,
        "float64": torch.int64,
    }
    want_bytes = want.view(raw_view[dtype]).numpy().tobytes()
    got = encode_like(values, dtype)
    nan = np.isnan(values)
    item = want.element_size()
    got_items = [got[i * item : (i + 1) * item] for i in range(len(values))]
    want_items = [want_bytes[i * item : (i + 1) * item] for i in range(len(values))]
    assert [g for g, n in zip(got_items, nan, strict=True) if not n] == [
        w for w, n in zip(want_items, nan, strict=True) if not n
    ]
    decoded = (
        tensor_codec.decode(np.frombuffer(got, "<u2"), "bfloat16")
        if dtype == "bfloat16"
        else (np.frombuffer(got, {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]))
    )
    assert np.isnan(decoded[nan]).all()


@pytest.mark.parametrize(
    ("dtype", "value"),
    [("float16", 70000.0), ("bfloat16", 3.4e38), ("float32", 1e39), ("int8", 200.0), ("int64", 0.5)],
)
def test_encode_like_refuses_overflow(dtype: str, value: float) -> None:
    with pytest.raises(DtypeOverflowError) as err:
        encode_like(np.array([1.0, value]), dtype)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_encode_like_integers() -> None:
    assert encode_like(np.array([3.0, -1.0]), "int64") == np.array([3, -1], "<i8").tobytes()


def _count_preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every pread the tensor reader makes from now on."""
    sizes: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        sizes.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)  # the byte source reads local files with os.pread
    return sizes


def test_large_file_reads_only_needed_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.pt"
    small = torch.arange(16.0)
    torch.save({"big": torch.zeros(13_000_000), "bn.running_mean": small, "view": small[2::4]}, path)
    assert path.stat().st_size > 50_000_000
    tracemalloc.start()
    ckpt = load_checkpoint(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5_000_000
    read = _count_preads(monkeypatch)
    assert read_tensor(ckpt.root["bn.running_mean"]).tolist() == small.tolist()
    assert read_tensor(ckpt.root["view"]).tolist() == [2.0, 6.0, 10.0, 14.0]
    assert read == [64, 13 * 4]  # the view spans elements 2..14 of its storage


def test_reading_does_not_import_torch(tmp_path: Path) -> None:
    zip_path, st_path = tmp_path / "a.pt", tmp_path / "b.safetensors"
    sd = torch.nn.BatchNorm2d(4).state_dict()
    torch.save({"state_dict": sd, "bf": torch.ones(2, dtype=torch.bfloat16)}, zip_path)
    save_file({"w": torch.ones(3), "h": torch.ones(2).half()}, st_path)
    script = textwrap.dedent(f"""
        import sys
        from bnaudit.checkpoint import iter_tensors, load_checkpoint, read_tensor
        for p in ({str(zip_path)!r}, {str(st_path)!r}):
            ckpt = load_checkpoint(p)
            n = sum(read_tensor(t).size >= 0 for _, t in iter_tensors(ckpt.root))
            assert n >= 2, n
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_detect_format_by_content_not_name(tmp_path: Path) -> None:
    st = tmp_path / "weights.pt"
    save_file({"w": torch.ones(3)}, st)
    z = tmp_path / "weights.safetensors"
    torch.save({"w": torch.ones(3)}, z)
    legacy = tmp_path / "weights.json"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert [detect_format(p) for p in (st, z, legacy)] == ["safetensors", "torch-zip", "torch-legacy"]


def test_read_tensors_equals_torch_and_batches_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several files, strided views, offsets, bf16, an empty tensor, and a gap too large to read across.
    base = torch.arange(40.0)
    first = {
        "a.running_mean": torch.randn(8),
        "a.running_var": torch.rand(8) + 0.5,
        "a.view": base[3::5],
        "a.t": torch.randn(3, 4).t(),
        "a.bf": torch.randn(6).to(torch.bfloat16),
        "a.empty": torch.zeros(0),
        "far": torch.zeros(tensors_module._MAX_GAP_BYTES),  # 4x the gap: what follows is not read across it
        "b.running_mean": torch.randn(5, dtype=torch.float64),
    }
    second = {"c.running_var": torch.rand(7) + 0.1}
    paths = [tmp_path / "first.pt", tmp_path / "second.pt"]
    torch.save(first, paths[0])
    torch.save(second, paths[1])
    roots = [load_checkpoint(p).root for p in paths]
    wanted = [("b.running_mean", 0), ("a.view", 0), ("c.running_var", 1), ("a.running_mean", 0), ("a.t", 0),
              ("a.bf", 0), ("a.empty", 0), ("a.running_var", 0)]  # fmt: skip
    reads = _count_preads(monkeypatch)
    got = tensors_module.read_tensors([roots[f][k] for k, f in wanted])
    for (key, f), array in zip(wanted, got, strict=True):
        expected = (first if f == 0 else second)[key].to(torch.float64).numpy()
        np.testing.assert_array_equal(np.asarray(array, dtype=np.float64), expected, err_msg=key)
        assert array.flags.c_contiguous and array.flags.writeable
    # The six small tensors of 'a' before the gap in one read, 'b' after it in another, 'c' in its own file.
    assert len(reads) == 3
    assert sum(reads) < tensors_module._MAX_GAP_BYTES
