"""Recognising ranks laid out like a checkpoint already read (bnaudit.checkpoint.same_layout).

The files are written by torch.save; the expected statistics come from torch.load in float64, and every
mutation is made to bytes located here with the standard library's zipfile, independently of the module.
"""

from __future__ import annotations

import dataclasses
import glob
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.audit import compare as audit
from bnaudit.audit import rank_stream
from bnaudit.bn.layers import find_bn_layers
from bnaudit.bn.layerstats import layer_tensor_refs, read_layers
from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.same_layout import LayoutTemplate
from bnaudit.report import json_format
from bnaudit.report.model import FailOn

ROOT = Path(__file__).resolve().parents[2]


def _save_rank(path: Path, seed: int) -> None:
    torch.manual_seed(0)  # the same weights on every rank, as DDP keeps them
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
    )
    generator = torch.Generator().manual_seed(seed)  # per-rank running statistics
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(100 + seed)
    torch.save({"model": model.state_dict(), "epoch": 3}, path)


@pytest.fixture
def ranks(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"ckpt_rank{r}.pt" for r in range(3)]
    for r, path in enumerate(paths):
        _save_rank(path, r)
    return paths


def _template(path: Path) -> tuple[LayoutTemplate, list]:
    ckpt = load_checkpoint(path)
    sd = ckpt.state_dicts[0]
    wanted = [(sd, bn) for bn in find_bn_layers(sd.tensors)]
    template = LayoutTemplate.of(ckpt, layer_tensor_refs(wanted))
    assert template is not None
    return template, wanted


def _expected(path: Path) -> dict[str, np.ndarray]:
    state = torch.load(path, weights_only=True)["model"]
    return {k: v.double().numpy() for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def test_a_rank_of_the_same_job_is_read_through_the_template(ranks: list[Path]) -> None:
    template, wanted = _template(ranks[0])
    assert template.same_layout(ranks[1], layer_tensor_refs(wanted))
    stats = read_layers(wanted, "rank1", path=ranks[1])
    expected = _expected(ranks[1])
    for (_, bn), layer in zip(wanted, stats, strict=True):
        np.testing.assert_array_equal(layer.mean, expected[bn.running_mean])
        np.testing.assert_array_equal(layer.var, expected[bn.running_var])
        assert layer.num_batches_tracked == 101
    assert not np.array_equal(stats[0].mean, _expected(ranks[0])[wanted[0][1].running_mean])


def test_a_file_name_of_another_length_is_another_layout(ranks: list[Path], tmp_path: Path) -> None:
    longer = tmp_path / "ckpt_rank10.pt"
    _save_rank(longer, 10)
    template, wanted = _template(ranks[0])
    assert not template.same_layout(longer, layer_tensor_refs(wanted))


def _directory_entry(data: bytes, start_dir: int, name: str) -> int:
    """Offset of an entry's central directory header (its name follows the 46 fixed bytes)."""
    at = data.index(name.encode(), start_dir)
    return at - 46


def _mutated(src: Path, dst: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    shutil.copyfile(src, dst)
    with zipfile.ZipFile(dst) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        start_dir = zf.start_dir
    data = bytearray(dst.read_bytes())
    mutate(data, infos, start_dir)
    dst.write_bytes(bytes(data))
    return dst


def _first_storage(wanted: list) -> str:
    key = wanted[0][0].tensors[wanted[0][1].running_mean].storage.key  # e.g. "ckpt_rank0/data/1"
    return "ckpt_rank7/" + key.split("/", 1)[1]


def _flip_crc(data: bytearray, infos, start_dir, name: str) -> None:  # type: ignore[no-untyped-def]
    central = _directory_entry(bytes(data), start_dir, name)
    data[central + 16] ^= 0xFF
    data[infos[name].header_offset + 14] ^= 0xFF


def test_mutations(ranks: list[Path], tmp_path: Path) -> None:
    template, wanted = _template(ranks[0])
    refs = layer_tensor_refs(wanted)
    source = tmp_path / "ckpt_rank7.pt"
    _save_rank(source, 7)
    assert template.same_layout(source, refs)
    storage = _first_storage(wanted)  # an entry read_layers reads

    def check(name: str, mutate, same: bool) -> None:  # type: ignore[no-untyped-def]
        path = _mutated(source, tmp_path / "mutated" / "ckpt_rank7.pt", mutate)
        assert template.same_layout(path, refs) is same, name

    (tmp_path / "mutated").mkdir()
    # A storage's CRC-32 differs between ranks anyway: still the same layout, and read correctly.
    check("storage crc", lambda d, i, s: _flip_crc(d, i, s, storage), True)
    # The pickle's CRC-32 is compared: a corrupt one is left to the full reader to report.
    check("pickle crc", lambda d, i, s: _flip_crc(d, i, s, "ckpt_rank7/data.pkl"), False)

    def pickle_byte(data: bytearray, infos, start_dir) -> None:  # type: ignore[no-untyped-def]
        info = infos["ckpt_rank7/data.pkl"]
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x01

    check("pickle byte", pickle_byte, False)

    def local_extra_length(data: bytearray, infos, start_dir) -> None:  # type: ignore[no-untyped-def]
        data[infos[storage].header_offset + 28] ^= 0x02  # the data would start elsewhere

    check("local extra length", local_extra_length, False)

    def header_offset(data: bytearray, infos, start_dir) -> None:  # type: ignore[no-untyped-def]
        data[_directory_entry(bytes(data), start_dir, storage) + 42] ^= 0x40

    check("directory header offset", header_offset, False)

    def one_other_folder(data: bytearray, infos, start_dir) -> None:  # type: ignore[no-untyped-def]
        at = bytes(data).index(storage.encode(), start_dir)
        data[at : at + len("ckpt_rank7")] = b"ckpt_rankX"

    check("one entry in another folder", one_other_folder, False)
    check("one byte longer", lambda d, i, s: d.extend(b"\0"), False)
    check("truncated", lambda d, i, s: d.__delitem__(slice(len(d) - 10, None)), False)
    assert not template.same_layout(tmp_path / "missing.pt", refs)

    crc_only = _mutated(source, tmp_path / "ckpt_rank8.pt", lambda d, i, s: _flip_crc(d, i, s, storage))
    assert template.same_layout(crc_only, refs)
    stats = read_layers(wanted, "rank8", path=crc_only)
    np.testing.assert_array_equal(stats[0].mean, _expected(source)[wanted[0][1].running_mean])


def test_only_plain_torch_zip_files_make_templates(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}, path)
    assert LayoutTemplate.of(load_checkpoint(path), []) is None


def _render(files: list[str]) -> str:
    return json_format.render(audit.compare_ranks(files), FailOn("error"))


@pytest.mark.parametrize("folder", ["ddp_nosync_sorted", "ddp_sync"])
def test_compare_reports_the_same_with_and_without_templates(folder: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    files = sorted(glob.glob(str(ROOT / "fixtures" / folder / "ckpt_rank*.pt")))
    fast = _render(files)
    monkeypatch.setattr(rank_stream, "MAX_LAYOUT_TEMPLATES", 0)
    assert _render(files) == fast


def test_compare_across_layout_groups(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # r0-r9 and r10-r11 differ in name length, so in layout: the first of each group becomes the template.
    files = []
    for r in range(12):
        path = tmp_path / f"r{r}.pt"
        _save_rank(path, r)
        files.append(str(path))
    seen = {"same": 0, "other": 0}
    original = LayoutTemplate.same_layout

    def counting(self: LayoutTemplate, path: Path, refs) -> bool:  # type: ignore[no-untyped-def]
        same = original(self, path, refs)
        seen["same" if same else "other"] += 1
        return same

    monkeypatch.setattr(LayoutTemplate, "same_layout", counting)
    fast = _render(files)
    assert seen == {"same": 10, "other": 1}  # r1-r9 and r11 through a template; r10 read in full
    monkeypatch.setattr(rank_stream, "MAX_LAYOUT_TEMPLATES", 0)
    assert _render(files) == fast


def _rewrite_as_zip64(src: Path, dst: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same entries, stored, in an archive whose offsets all overflow into ZIP64 fields (as in a
    checkpoint over 4 GB): the standard library's writer with its ZIP64 threshold lowered."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rest = info.filename.split("/", 1)[1]
            zout.writestr(f"{dst.stem}/{rest}", zin.read(info.filename))
    monkeypatch.undo()
    # The writer keeps the real directory offset in the plain end record while it fits; over 4 GB it holds
    # 0xFFFFFFFF and readers follow the ZIP64 record.
    data = bytearray(dst.read_bytes())
    struct.pack_into("<I", data, len(data) - 22 + 16, 0xFFFFFFFF)
    dst.write_bytes(bytes(data))


def test_zip64_archives_share_layouts_too(ranks: list[Path], tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    from bnaudit.checkpoint.zipdir import directory_bounds

    big = [tmp_path / "z64" / f"ckpt_rank{r}.pt" for r in range(2)]
    big[0].parent.mkdir()
    for src, dst in zip(ranks, big, strict=False):
        _rewrite_as_zip64(src, dst, monkeypatch)
    tail = big[0].read_bytes()[-22:]
    assert struct.unpack_from("<I", tail, 16)[0] == 0xFFFFFFFF  # the plain end record points to ZIP64's
    fd = os.open(big[0], os.O_RDONLY)
    try:
        with zipfile.ZipFile(big[0]) as zf:
            assert directory_bounds(fd, 0, os.fstat(fd).st_size)[0] == zf.start_dir
    finally:
        os.close(fd)
    template, wanted = _template(big[0])
    assert template.same_layout(big[1], layer_tensor_refs(wanted))
    stats = read_layers(wanted, "rank1", path=big[1])
    np.testing.assert_array_equal(stats[-1].var, _expected(ranks[1])[wanted[-1][1].running_var])


def test_a_template_serves_only_the_storages_it_was_made_for(ranks: list[Path]) -> None:
    template, wanted = _template(ranks[0])
    refs = layer_tensor_refs(wanted)
    assert template.same_layout(ranks[1], refs[:2])  # a subset is fine
    whole = load_checkpoint(ranks[0]).state_dicts[0].tensors
    assert not template.same_layout(ranks[1], [whole["0.weight"]])  # a conv weight: not a planned read
    with pytest.raises(dataclasses.FrozenInstanceError):
        template.size = 0  # type: ignore[misc]
