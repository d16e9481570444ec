"""Helpers shared by the checkpoint reader tests: compare bnaudit's lazy tensors with torch.load."""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnaudit.checkpoint import Checkpoint, TensorRef, iter_tensors, load_checkpoint
from bnaudit.checkpoint.tensors import read_tensor

WIDENED = {
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
}


def torch_tensors(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    """(key path, tensor) for every tensor nested in dicts, lists and tuples, like ``iter_tensors``."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from torch_tensors(v, (*prefix, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from torch_tensors(v, (*prefix, i))


def expected_array(t: torch.Tensor) -> np.ndarray:
    """What ``read_tensor`` must return for ``t``, computed by torch."""
    t = t.detach()
    if t.dtype in WIDENED:
        return t.to(torch.float64).numpy()
    if t.dtype == torch.uint16:
        return t.to(torch.int64).numpy().astype(np.uint16)
    return t.numpy()


def assert_same_tensor(ref: TensorRef, t: torch.Tensor, where: Any = "") -> None:
    assert ref.dtype == str(t.dtype).removeprefix("torch."), where
    assert ref.shape == tuple(t.shape), where
    assert ref.stride == tuple(t.stride()), where
    assert ref.offset == t.storage_offset(), where
    got, want = read_tensor(ref), expected_array(t)
    assert got.dtype == want.dtype, (where, got.dtype, want.dtype)
    assert got.shape == want.shape, where
    np.testing.assert_array_equal(got, want, err_msg=str(where))


def assert_matches_torch(path: Path) -> Checkpoint:
    """Load ``path`` with bnaudit and with torch, and compare every tensor reachable through containers."""
    ckpt = load_checkpoint(path)
    reference = torch.load(path, weights_only=False)
    ours = dict(iter_tensors(ckpt.root))
    theirs = dict(torch_tensors(reference))
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert_same_tensor(ours[key], t, key)
    return ckpt


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
    """Copy a zip entry by entry (stored), replacing (or dropping, for None) the named entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename in replace:
                data = replace[info.filename]
                if data is not None:
                    zout.writestr(info.filename, data)
            else:
                zout.writestr(info.filename, zin.read(info.filename))


def entry_name(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith(suffix))


def write_zip64_variants(src: Path, dst: Path) -> None:
    """Re-pack a torch zip with every layout variant: ZIP64 extras and end records, data descriptors with and
    without signature, 4- and 8-byte sizes, and one entry with its CRC in the local header."""
    with zipfile.ZipFile(src) as zf:
        items = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    out = bytearray()
    central = bytearray()
    for index, (name, data) in enumerate(items):
        raw_name, crc, offset = name.encode(), zlib.crc32(data), len(out)
        variant = index % 5  # 0-3: descriptor forms; 4: no descriptor
        flags = 0x08 if variant < 4 else 0
        z64_local = struct.pack(
            "<HHQQ", 1, 16, len(data) if variant == 4 else 0, len(data) if variant == 4 else 0
        )
        out += struct.pack(
            "<4sHHHHHLLLHH",
            b"PK\x03\x04",
            45,
            flags,
            0,
            0,
            0,
            crc if variant == 4 else 0,
            0xFFFFFFFF,
            0xFFFFFFFF,
            len(raw_name),
            len(z64_local),
        )
        out += raw_name + z64_local
        # torch wants storages 64-byte aligned; pad with an extra field is what torch does, but the reader here
        # only needs correct offsets, so alignment is not required for this test.
        out += data
        if variant == 0:
            out += struct.pack("<4sLLL", b"PK\x07\x08", crc, len(data), len(data))
        elif variant == 1:
            out += struct.pack("<LLL", crc, len(data), len(data))
        elif variant == 2:
            out += struct.pack("<4sLQQ", b"PK\x07\x08", crc, len(data), len(data))
        elif variant == 3:
            out += struct.pack("<LQQ", crc, len(data), len(data))
        z64_central = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack(
            "<4sHHHHHHLLLHHHHHLL",
            b"PK\x01\x02",
            45,
            45,
            flags,
            0,
            0,
            0,
            crc,
            0xFFFFFFFF,
            0xFFFFFFFF,
            len(raw_name),
            len(z64_central),
            0,
            0,
            0,
            0,
            0xFFFFFFFF,
        )
        central += raw_name + z64_central
    cd_offset = len(out)
    out += central
    z64_eocd = len(out)
    out += struct.pack(
        "<4sQHHLLQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, len(items), len(items), len(central), cd_offset
    )
    out += struct.pack("<4sLQL", b"PK\x06\x07", 0, z64_eocd, 1)
    out += struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    dst.write_bytes(bytes(out))


def small_bn_model() -> torch.nn.Module:
    """A conv net with an affine and a non-affine BatchNorm2d, run once in train mode so the statistics
    move off their reset values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, affine=False)),
    )
    model(torch.randn(2, 3, 5, 5))
    return model
