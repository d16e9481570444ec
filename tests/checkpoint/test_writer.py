"""The byte-patching writer: only the statistics' bytes change, CRCs follow, unsafe layouts are refused."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import write_zip64_variants
from safetensors import safe_open
from safetensors.torch import save_file

from bnaudit.checkpoint import DtypeOverflowError, load_checkpoint
from bnaudit.checkpoint import writer as writer_mod
from bnaudit.checkpoint.writer import TensorPatch, check_output_path, write_patched
from bnaudit.checkpoint.zippatch import locate_entries
from bnaudit.errors import InternalError, OutputError, UnsupportedFormatError
from tests.conftest import REPO


def small_state(dtype: torch.dtype = torch.float32) -> OrderedDict:
    sd = OrderedDict()
    sd["conv.weight"] = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd["bn.weight"] = torch.ones(4)
    sd["bn.bias"] = torch.zeros(4)
    sd["bn.running_mean"] = torch.tensor([0.5, -1.0, 2.0, 0.25]).to(dtype)
    sd["bn.running_var"] = torch.tensor([1.0, 2.0, 0.5, 4.0]).to(dtype)
    sd["bn.num_batches_tracked"] = torch.tensor(7)
    return sd


NEW_MEAN = np.array([1.0, 2.0, 3.0, 4.0])
NEW_VAR = np.array([0.1, 0.2, 0.3, 1e-3])


def patches_for(path: Path, sd_name: str = "model", mean=NEW_MEAN, var=NEW_VAR) -> tuple:
    ckpt = load_checkpoint(path)
    sd = ckpt.state_dict(sd_name)
    keys = [k for k in sd.tensors if k.endswith(("running_mean", "running_var"))]
    values = {k: (mean if k.endswith("mean") else var) for k in keys}
    return ckpt, [TensorPatch(sd_name, k, sd.tensors[k], values[k]) for k in keys]


def changed_bytes(a: Path, b: Path) -> list[int]:
    x, y = np.frombuffer(a.read_bytes(), np.uint8), np.frombuffer(b.read_bytes(), np.uint8)
    assert x.size == y.size
    return np.flatnonzero(x != y).tolist()


def allowed_offsets(ckpt, patches, crc_fields=()) -> set[int]:
    allowed = set()
    for p in patches:
        start, end = p.ref.byte_span()
        allowed.update(range(start, end))
    for f in crc_fields:
        allowed.update(range(f, f + 4))
    return allowed


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_torch_zip_only_stat_bytes_and_crcs_change(tmp_path):
    src, out = tmp_path / "ref.pt", tmp_path / "out.pt"
    obj = {"model": small_state(), "epoch": 3, "note": "kept"}
    torch.save(obj, src)
    ckpt, patches = patches_for(src)
    result = write_patched(ckpt, patches, out)
    entries = locate_entries(src)
    crc_fields = [f for e in entries.values() if e.name in result.crc_entries for f in e.crc_fields]
    assert set(changed_bytes(src, out)) <= allowed_offsets(ckpt, patches, crc_fields)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
        for name in result.crc_entries:
            assert zlib.crc32(zf.read(name)) == zf.getinfo(name).CRC
    loaded = torch.load(out, weights_only=True)
    assert loaded["epoch"] == 3 and loaded["note"] == "kept"
    np.testing.assert_array_equal(loaded["model"]["bn.running_mean"].numpy(), NEW_MEAN.astype(np.float32))
    np.testing.assert_array_equal(loaded["model"]["bn.running_var"].numpy(), NEW_VAR.astype(np.float32))
    for k in ("conv.weight", "bn.weight", "bn.bias", "bn.num_batches_tracked"):
        assert torch.equal(loaded["model"][k], obj["model"][k])
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert len(result.reference_sha256) == 64 and no_temp_files(tmp_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------ crafted ZIP64 archive


def test_zip64_archive_with_every_descriptor_form(tmp_path):
    plain, src, out = tmp_path / "plain.pt", tmp_path / "z64.pt", tmp_path / "out.pt"
    torch.save({"model": small_state(), "epoch": 1}, plain)
    write_zip64_variants(plain, src)
    with zipfile.ZipFile(src) as zf:
        assert zf.testzip() is None
    assert torch.load(src, weights_only=True)["epoch"] == 1
    ckpt, patches = patches_for(src)
    result = write_patched(ckpt, patches, out)
    entries = locate_entries(src)
    assert {len(e.crc_fields) for e in entries.values()} == {2}  # central + (descriptor or local header)
    crc_fields = [f for e in entries.values() if e.name in result.crc_entries for f in e.crc_fields]
    assert set(changed_bytes(src, out)) <= allowed_offsets(ckpt, patches, crc_fields)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    loaded = torch.load(out, weights_only=True)
    np.testing.assert_array_equal(loaded["model"]["bn.running_mean"].numpy(), NEW_MEAN.astype(np.float32))


def test_real_torch_zip_is_zip64_with_16_byte_descriptors(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"model": small_state()}, path)
    data = path.read_bytes()
    assert b"PK\x06\x06" in data  # torch always writes the ZIP64 end record
    entry = next(e for e in locate_entries(path).values() if e.name.endswith("data/0"))
    descriptor_crc = next(f for f in entry.crc_fields if f > entry.data_offset)
    assert data[descriptor_crc - 4 : descriptor_crc] == b"PK\x07\x08"


# ------------------------------------------------------------------------------------ refusals


def test_view_sharing_a_statistics_storage_is_refused(tmp_path):
    sd = small_state()
    torch.save({"model": sd, "alias": sd["bn.running_mean"][1:3]}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    with pytest.raises(UnsupportedFormatError, match="shared with a float32 tensor of shape \\[2\\]"):
        write_patched(ckpt, patches, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists() and no_temp_files(tmp_path)


def test_same_tensor_twice_is_rewritten_identically(tmp_path):
    sd = small_state()
    torch.save({"model": sd, "again": sd["bn.running_mean"]}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    write_patched(ckpt, patches, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(loaded["again"], loaded["model"]["bn.running_mean"])


def test_statistics_in_one_flat_storage_are_patched_in_place(tmp_path):
    flat = torch.arange(10, dtype=torch.float32)
    sd = small_state()
    sd["bn.running_mean"], sd["bn.running_var"] = flat[0:4], flat[4:8]
    torch.save({"model": sd}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    write_patched(ckpt, patches, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
    np.testing.assert_array_equal(loaded["bn.running_var"].numpy(), NEW_VAR.astype(np.float32))
    # the storage's tail (elements 8 and 9) belongs to no patched tensor and keeps its bytes
    assert loaded["bn.running_mean"].untyped_storage().nbytes() == 40
    np.testing.assert_array_equal(
        torch.frombuffer(bytearray(loaded["bn.running_var"].untyped_storage()), dtype=torch.float32)[
            8:
        ].numpy(),
        [8, 9],
    )


def test_non_contiguous_statistics_are_refused(tmp_path):
    sd = small_state()
    sd["bn.running_mean"] = torch.zeros(8)[::2]
    torch.save({"model": sd}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    with pytest.raises(UnsupportedFormatError, match="not contiguous"):
        write_patched(ckpt, patches, tmp_path / "out.pt")


def test_compressed_entry_is_refused(tmp_path):
    torch.save({"model": small_state()}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(tmp_path / "ref.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    with pytest.raises(UnsupportedFormatError, match="compressed zip entry"):
        write_patched(ckpt, patches, tmp_path / "out.pt")


def test_value_out_of_dtype_range_writes_nothing(tmp_path):
    torch.save({"model": small_state(torch.float16)}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt", var=np.array([1.0, 1e6, 1.0, 1.0]))
    with pytest.raises(DtypeOverflowError, match=r"model:bn.running_var.*float16"):
        write_patched(ckpt, patches, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists() and no_temp_files(tmp_path)


def test_output_path_checks(tmp_path):
    src = tmp_path / "ref.pt"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="never writes over an input"):
        check_output_path(src, [src], force=True)
    (tmp_path / "out.pt").write_bytes(b"y")
    with pytest.raises(OutputError, match="--force"):
        check_output_path(tmp_path / "out.pt", [src], force=False)
    check_output_path(tmp_path / "out.pt", [src], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.pt", [src], force=False)


# ------------------------------------------------------------------------------------ other containers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_data_identical_except_statistics(tmp_path, dtype):
    src, out = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    tensors = {k: v.contiguous() for k, v in small_state(dtype).items()}
    save_file(tensors, src, metadata={"format": "pt", "origin": "test"})
    ckpt, patches = patches_for(src, "")
    result = write_patched(ckpt, patches, out, metadata={"bnaudit": '{"method":"pooled"}'})
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test", "bnaudit": '{"method":"pooled"}'}
        assert list(f.keys()) == list(safe_open(str(src), framework="pt").keys())
        for key, value in tensors.items():
            got = f.get_tensor(key)
            if key.endswith("running_mean"):
                assert torch.equal(got, torch.tensor(NEW_MEAN, dtype=torch.float64).to(dtype))
            elif key.endswith("running_var"):
                assert torch.equal(got, torch.tensor(NEW_VAR, dtype=torch.float64).to(dtype))
            else:
                assert torch.equal(got, value)
    old_start = 8 + struct.unpack("<Q", src.read_bytes()[:8])[0]
    new_start = 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert new_start % 8 == 0
    old_data, new_data = (
        np.frombuffer(src.read_bytes()[old_start:], np.uint8),
        np.frombuffer(out.read_bytes()[new_start:], np.uint8),
    )
    allowed = {o - old_start for o in allowed_offsets(ckpt, patches)}
    assert set(np.flatnonzero(old_data != new_data).tolist()) <= allowed
    assert result.metadata == {"bnaudit": '{"method":"pooled"}'}


def test_legacy_torch_file_is_patched(tmp_path):
    src, out = tmp_path / "legacy.pt", tmp_path / "out.pt"
    torch.save({"model": small_state(), "epoch": 2}, src, _use_new_zipfile_serialization=False)
    ckpt, patches = patches_for(src)
    assert ckpt.format == "torch-legacy"
    write_patched(ckpt, patches, out)
    assert set(changed_bytes(src, out)) <= allowed_offsets(ckpt, patches)
    loaded = torch.load(out, weights_only=True)
    np.testing.assert_array_equal(loaded["model"]["bn.running_mean"].numpy(), NEW_MEAN.astype(np.float32))


def test_sharded_checkpoint_is_refused_for_writing(tmp_path):
    save_file({k: v.contiguous() for k, v in small_state().items()}, tmp_path / "m-00001.safetensors")
    index = {"weight_map": {k: "m-00001.safetensors" for k in small_state()}, "metadata": {}}
    (tmp_path / "m.safetensors.index.json").write_text(__import__("json").dumps(index))
    ckpt = load_checkpoint(tmp_path / "m.safetensors.index.json")
    sd = ckpt.state_dicts[0]
    patch = TensorPatch(sd.name, "bn.running_mean", sd.tensors["bn.running_mean"], NEW_MEAN)
    with pytest.raises(UnsupportedFormatError, match="cannot be written"):
        write_patched(ckpt, [patch], tmp_path / "out.safetensors")


# ------------------------------------------------------------------------------------ atomicity


def test_interrupt_mid_copy_leaves_nothing(tmp_path, monkeypatch):
    torch.save({"model": small_state()}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    real_copy = writer_mod._copy_range

    def interrupted(src_fd, dst_fd, offset, count):
        real_copy(src_fd, dst_fd, offset, count // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "_copy_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_patched(ckpt, patches, tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"]


def test_copy_falls_back_to_read_write_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    torch.save({"model": small_state()}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    calls = []

    def refusing(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writer_mod.os, "copy_file_range", refusing)
    result = write_patched(ckpt, patches, tmp_path / "out.pt")
    assert len(calls) == 1  # refused once, then the rest went through memory
    ref, out = (tmp_path / "ref.pt").read_bytes(), (tmp_path / "out.pt").read_bytes()
    assert result.reference_sha256 == hashlib.sha256(ref).hexdigest()
    assert result.output_sha256 == hashlib.sha256(out).hexdigest()
    assert len(out) == len(ref) and out != ref


def test_failed_verification_is_internal_and_leaves_nothing(tmp_path, monkeypatch):
    torch.save({"model": small_state()}, tmp_path / "ref.pt")
    ckpt, patches = patches_for(tmp_path / "ref.pt")
    real_apply = writer_mod._apply

    def corrupting(fd, ranges, shift):
        real_apply(fd, ranges, shift)
        os.pwrite(fd, b"\x00", 0x60)  # a byte inside data.pkl: the pickle is never supposed to change

    monkeypatch.setattr(writer_mod, "_apply", corrupting)
    with pytest.raises(InternalError, match="verification"):
        write_patched(ckpt, patches, tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"]


def test_file_size_limit_is_a_clean_output_error(tmp_path):
    """A full disk (simulated with RLIMIT_FSIZE, SIGXFSZ ignored) is exit-2 material and leaves no file."""
    src = tmp_path / "ref.pt"
    torch.save({"model": small_state(), "big": torch.zeros(50_000)}, src)
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from bnaudit.checkpoint import load_checkpoint\n"
        "from bnaudit.checkpoint.tensors import read_tensor\n"
        "from bnaudit.checkpoint.writer import TensorPatch, write_patched\n"
        "from bnaudit.errors import OutputError\n"
        f"ckpt = load_checkpoint(Path({str(src)!r}))\n"
        "sd = ckpt.state_dict('model')\n"
        "patches = [TensorPatch('model', k, t, read_tensor(t) + 1) for k, t in sd.tensors.items() if 'running' in k]\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({src.stat().st_size // 2}, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    write_patched(ckpt, patches, Path({str(tmp_path / 'out.pt')!r}))\n"
        "except OutputError as exc:\n"
        "    print(exc); sys.exit(2)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "disk is full" in result.stdout and "nothing was written" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"]
