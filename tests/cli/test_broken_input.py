"""Broken input through the real CLI: exit 2, exactly one stderr line, never a traceback."""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import bn_state, call_main, save_ranks

_CD_SIGNATURE = b"PK\x01\x02"
_CD_HEADER_OFFSET = 42  # offset of "relative offset of local header" inside a central directory record


def assert_one_line_exit_2(capsys: pytest.CaptureFixture[str], *args: str, fragment: str = "") -> str:
    """Run the CLI and require exit 2, one non-empty stderr line containing ``fragment``, no traceback."""
    code, out, err = call_main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    assert fragment in lines[0], lines[0]
    return lines[0]


def _torch_file(folder: Path, name: str = "ckpt.pt") -> Path:
    path = folder / name
    torch.save({"bn.running_mean": torch.arange(64.0), "bn.running_var": torch.ones(64)}, path)
    return path


def rewrite_entries(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Copy a torch zip entry by entry (stored, uncompressed), passing each entry's bytes through ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


def _cd_records(data: bytes) -> dict[str, int]:
    """Entry name -> position of its central-directory record."""
    records: dict[str, int] = {}
    pos = data.find(_CD_SIGNATURE)
    while pos != -1:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        records[data[pos + 46 : pos + 46 + name_len].decode()] = pos
        pos = data.find(_CD_SIGNATURE, pos + 46)
    return records


def edit_cd_field(path: Path, entry_suffix: str, field_offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of the central-directory record of the entry ending in ``entry_suffix``."""
    data = bytearray(path.read_bytes())
    target = next(pos for name, pos in _cd_records(bytes(data)).items() if name.endswith(entry_suffix))
    struct.pack_into(fmt, data, target + field_offset, value)
    path.write_bytes(bytes(data))


def set_header_offset(path: Path, entry_suffix: str, new_offset: int | None = None, like: str = "") -> None:
    """Point the entry ending in ``entry_suffix`` at ``new_offset``, or at the local header of the entry
    ending in ``like`` (so the two entries overlap), by editing the central directory in place."""
    if new_offset is None:
        data = path.read_bytes()
        source = next(pos for name, pos in _cd_records(data).items() if name.endswith(like))
        new_offset = struct.unpack_from("<I", data, source + _CD_HEADER_OFFSET)[0]
    edit_cd_field(path, entry_suffix, _CD_HEADER_OFFSET, "<I", new_offset)


def _safetensors(folder: Path) -> Path:
    path = folder / "model.safetensors"
    save_file({"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}, path)
    return path


# ----------------------------------------------------------------------------------- unreadable files


def test_missing_path(capsys, tmp_path: Path) -> None:
    assert_one_line_exit_2(capsys, "inspect", str(tmp_path / "nope.pt"), fragment="no such file")
    good = _torch_file(tmp_path)
    assert_one_line_exit_2(capsys, "compare", str(good), str(tmp_path / "nope_rank1.pt"), fragment="nope")


def test_directory_where_a_file_is_expected(capsys, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert_one_line_exit_2(capsys, "inspect", str(tmp_path / "run"), fragment="directory")


def test_empty_file(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty.pt").touch()
    assert_one_line_exit_2(capsys, "inspect", str(tmp_path / "empty.pt"), fragment="empty")


def test_truncated_zip(capsys, tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-300])
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment="truncated")


def test_text_file(capsys, tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("epoch 3, loss 0.12\n")
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment="text file")


def test_safetensors_corrupt_header(capsys, tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    data = bytearray(path.read_bytes())
    data[10:16] = b"\xff\xfe###"[:6].ljust(6, b"#")
    path.write_bytes(bytes(data))
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment="JSON")


def test_safetensors_oversized_header(capsys, tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment="header length")


def test_storage_shorter_than_shape(capsys, tmp_path: Path) -> None:
    src, short = _torch_file(tmp_path), tmp_path / "short.pt"
    rewrite_entries(src, short, lambda name, data: data[:100] if name.endswith("/data/0") else data)
    assert_one_line_exit_2(capsys, "inspect", str(short), fragment="needs 256")


def test_zip_entries_overlap(capsys, tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    set_header_offset(path, "/data/1", like="/data/0")
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment="overlap")


def test_zip_entry_points_outside_the_file(capsys, tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    set_header_offset(path, "/data/1", new_offset=path.stat().st_size + 4096)
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment=str(path))


def test_zip_entry_points_into_the_middle_of_another(capsys, tmp_path: Path) -> None:
    path = _torch_file(tmp_path)
    set_header_offset(path, "/data.pkl", new_offset=7)
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment=str(path))


# ------------------------------------------------------------------------------ readable, wrong content


def test_ranks_of_different_models(capsys, tmp_path: Path, rng: np.random.Generator) -> None:
    a = save_ranks(tmp_path, [bn_state({"layer1": 4}, rng)], name="a")[0]
    b = tmp_path / "b_rank1.pt"
    torch.save({"model": bn_state({"layer1": 4, "layer2": 2}, rng), "epoch": 3}, b)
    assert_one_line_exit_2(capsys, "compare", str(a), str(b), fragment="not the same model")
    c = tmp_path / "c_rank1.pt"
    torch.save({"model": bn_state({"layer1": 8}, rng), "epoch": 3}, c)
    assert_one_line_exit_2(capsys, "compare", str(a), str(c), fragment="shape")


def _ranks(tmp_path: Path, states: list[dict[str, torch.Tensor]]) -> list[str]:
    return [str(p) for p in save_ranks(tmp_path, states)]


def test_no_batchnorm_layers(capsys, tmp_path: Path) -> None:
    paths = _ranks(tmp_path, [{"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}] * 2)
    assert_one_line_exit_2(capsys, "compare", *paths, fragment="no BatchNorm")
    code, _, err = call_main(capsys, "compare", *paths, "--allow-empty")
    assert code == 0, err
    code, out, _ = call_main(capsys, "inspect", paths[0])
    assert code == 0 and "no-batchnorm" in out


def test_non_floating_statistics(capsys, tmp_path: Path) -> None:
    sd = {"bn.running_mean": torch.arange(4), "bn.running_var": torch.ones(4, dtype=torch.int64)}
    paths = _ranks(tmp_path, [sd, sd])
    assert_one_line_exit_2(capsys, "compare", *paths, fragment="floating")
    code, out, _ = call_main(capsys, "inspect", paths[0])
    assert code == 1 and "malformed-layer" in out


def test_mismatched_mean_and_var_shapes(capsys, tmp_path: Path) -> None:
    sd = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(3)}
    paths = _ranks(tmp_path, [sd, sd])
    assert_one_line_exit_2(capsys, "compare", *paths, fragment="shape")
    code, out, _ = call_main(capsys, "inspect", paths[0], "--format", "json")
    assert code == 1
    kinds = {f["kind"] for f in json.loads(out)["findings"]}
    assert "malformed-layer" in kinds


# ----------------------------------------------- regressions found by the mutation fuzzer (were exit 3 / hang)


@pytest.mark.parametrize(
    ("entry", "field_offset", "value", "fragment"),
    [
        ("/data.pkl", 6, 128, "not a complete zip"),  # "version needed" 12.8: zipfile NotImplementedError
        ("/data.pkl", 10, 99, "cannot read zip entry"),  # unknown compression method
        ("/data.pkl", 8, 0x0009, "cannot read zip entry"),  # encrypted flag: zipfile RuntimeError
        ("/data/0", 10, 99, "cannot decompress"),  # a storage that claims an unknown compression
    ],
)
def test_flipped_zip_fields_are_input_errors(
    capsys, tmp_path: Path, entry: str, field_offset: int, value: int, fragment: str
) -> None:
    path = _torch_file(tmp_path)
    edit_cd_field(path, entry, field_offset, "<H", value)
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment=fragment)


def test_huge_memo_index_does_not_allocate(capsys, tmp_path: Path) -> None:
    # LONG_BINPUT 0x7FFFFFF0: the C unpickler would size its memo array to twice that (32 GiB).
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02}r\xf0\xff\xff\x7f.")
    code, out, err = call_main(capsys, "inspect", str(path))
    assert code == 0 and "no-batchnorm" in out, err


def test_indented_json_is_still_json(capsys, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("        {" + json.dumps({"hidden": 3})[1:])
    assert_one_line_exit_2(capsys, "inspect", str(path), fragment="weight_map")
