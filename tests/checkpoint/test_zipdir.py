"""The one zip reader (bnaudit.checkpoint.zipdir / zipentries) against Python's zipfile, and its errors.

Expected offsets come from zipfile and from struct reads of the bytes written, never from the reader.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from ckpt_helpers import write_zip64_variants

from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.same_layout import LayoutTemplate
from bnaudit.checkpoint.torchzip import read_archive
from bnaudit.checkpoint.zipdir import ZipFormatError, read_directory
from bnaudit.checkpoint.zipentries import locate_entries, read_member
from bnaudit.checkpoint.zippatch import locate_entries as patch_entries
from bnaudit.errors import InputError
from tests.conftest import call_main


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(5)
    bn.running_mean.uniform_()
    return {"conv.weight": torch.randn(6, 3), **bn.state_dict()}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _state(), "epoch": 2}, path)
    return path


def _expected(path: Path, base: int = 0) -> dict[str, tuple[int, int, int, int, int, int]]:
    """name -> (header offset, data offset, stored size, size, method, crc) by zipfile and struct."""
    data = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            data_offset = info.header_offset + 30 + name_len + extra_len
            out[info.filename] = (
                base + info.header_offset, base + data_offset, info.compress_size, info.file_size,
                info.compress_type, info.CRC,
            )  # fmt: skip
    return out


def _located(path: Path, base: int = 0, end: int | None = None, descriptors: bool = False) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        return locate_entries(fd, read_directory(fd, base, end), descriptors=descriptors)
    finally:
        os.close(fd)


def _summary(entries: dict) -> dict[str, tuple[int, int, int, int, int, int]]:
    return {
        n: (e.header_offset, e.data_offset, e.stored_size, e.size, e.method, e.crc)
        for n, e in entries.items()
    }


def test_entries_equal_zipfiles_on_a_real_torch_save_file(saved: Path) -> None:
    assert _summary(_located(saved)) == _expected(saved)


def test_every_crc_field_holds_the_crc(saved: Path) -> None:
    data = saved.read_bytes()
    entries = patch_entries(saved)
    assert _summary(entries) == _expected(saved)
    for entry in entries.values():
        assert entry.descriptor_crc_at is not None  # torch writes a data descriptor after every entry
        assert data[entry.descriptor_crc_at - 4 : entry.descriptor_crc_at] == b"PK\x07\x08"
        assert len(entry.crc_fields) >= 2
        for at in entry.crc_fields:
            assert struct.unpack_from("<L", data, at)[0] == zlib.crc32(
                data[entry.data_offset :][: entry.size]
            )


def test_every_consumer_sees_the_same_entries(saved: Path) -> None:
    expected = _expected(saved)
    fd = os.open(saved, os.O_RDONLY)
    try:
        archive = read_archive(saved, fd)
    finally:
        os.close(fd)
    assert _summary(archive.entries) == expected
    assert _summary(patch_entries(saved)) == expected
    template = LayoutTemplate.of(load_checkpoint(saved), [])
    assert template is not None
    folder = template.folder.decode()
    assert {folder + n: e.header_offset for n, e in template.entries.items()} == {
        n: v[0] for n, v in expected.items()
    }


def test_an_archive_embedded_in_a_larger_file(saved: Path, tmp_path: Path) -> None:
    head, tail = b"\0" * 1000, b"trailing bytes"
    outer = tmp_path / "outer.bin"
    outer.write_bytes(head + saved.read_bytes() + tail)
    entries = _located(outer, len(head), len(head) + saved.stat().st_size)
    assert _summary(entries) == _expected(saved, base=len(head))
    fd = os.open(outer, os.O_RDONLY)
    try:
        pickle_entry = next(e for n, e in entries.items() if n.endswith("data.pkl"))
        with zipfile.ZipFile(saved) as zf:
            assert read_member(fd, pickle_entry) == zf.read(pickle_entry.name)
    finally:
        os.close(fd)


def test_zip64_records_and_every_descriptor_form(saved: Path, tmp_path: Path) -> None:
    variants = tmp_path / "z64.pt"
    write_zip64_variants(saved, variants)
    assert _summary(_located(variants)) == _expected(variants)
    data = variants.read_bytes()
    for entry in patch_entries(variants).values():
        assert len(entry.crc_fields) == 2
        for at in entry.crc_fields:
            assert struct.unpack_from("<L", data, at)[0] == entry.crc


def test_plain_end_record_pointing_to_zip64(saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    end = len(data) - 22
    struct.pack_into("<HHLL", data, end + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    path = tmp_path / "z.pt"
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert _summary(_located(path)) == _expected(saved)


def test_descriptors_written_by_zipfile_to_a_stream(tmp_path: Path) -> None:
    class Stream(io.RawIOBase):  # not seekable: zipfile writes data descriptors
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
            self.data += bytes(b)
            return len(b)

    stream = Stream()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04K\x01.")
        zf.writestr("archive/data/0", b"\x01" * 40)
    path = tmp_path / "stream.zip"
    path.write_bytes(bytes(stream.data))
    entries = patch_entries(path)
    assert _summary(entries) == _expected(path)
    assert all(e.flags & 0x08 and e.descriptor_crc_at is not None for e in entries.values())


def _signature_at(data: bytes, signature: bytes, which: int = 0) -> int:
    at = -1
    for _ in range(which + 1):
        at = data.index(signature, at + 1)
    return at


@pytest.mark.parametrize(
    ("signature", "which", "message"),
    [
        (b"PK\x05\x06", 0, "not a complete zip archive"),  # end record
        (b"PK\x06\x06", 0, "ZIP64 end record"),
        (b"PK\x01\x02", 1, "unreadable record"),  # a central directory record
        (b"PK\x03\x04", 2, "no local header"),  # a local header
    ],
)
def test_a_mutated_record_is_an_input_error(
    saved: Path, tmp_path: Path, capsys, signature: bytes, which: int, message: str
) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(saved.read_bytes())
    at = (
        _signature_at(bytes(data), signature, which) if signature != b"PK\x05\x06" else data.rindex(signature)
    )
    data[at + 2] ^= 0xFF
    path = tmp_path / "bad.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=message) as exc:
        load_checkpoint(path)
    assert exc.value.fields.path == str(path)
    code, _, err = call_main(capsys, "inspect", str(path))
    assert code == 2 and message in err and "Traceback" not in err


def test_a_corrupt_pickle_crc_is_an_input_error(saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    pickle_entry = next(e for n, e in _located(saved).items() if n.endswith("data.pkl"))
    data[pickle_entry.data_offset + 3] ^= 0x01
    path = tmp_path / "bad.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="Bad CRC-32") as exc:
        load_checkpoint(path)
    assert exc.value.fields.where == pickle_entry.name


def test_a_mutated_descriptor_is_refused_by_the_patcher(saved: Path, tmp_path: Path) -> None:
    entry = next(iter(patch_entries(saved).values()))
    assert entry.descriptor_crc_at is not None
    data = bytearray(saved.read_bytes())
    data[entry.descriptor_crc_at] ^= 0xFF
    path = tmp_path / "bad.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="data descriptor") as exc:
        patch_entries(path)
    assert exc.value.fields.fix is not None and "cannot patch" in exc.value.fields.fix


def test_overlapping_and_truncated_entries(saved: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(saved) as zf:
        infos = zf.infolist()
    data = bytearray(saved.read_bytes())
    directory = _signature_at(bytes(data), b"PK\x01\x02", 1)  # the second record: point it at the first entry
    struct.pack_into("<L", data, directory + 42, infos[0].header_offset)
    overlapping = tmp_path / "overlap.pt"
    overlapping.write_bytes(bytes(data))
    with pytest.raises(ZipFormatError, match="overlap"):
        _located(overlapping)
    with pytest.raises(InputError, match="overlap"):
        load_checkpoint(overlapping)


def test_deflated_member_is_inflated_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "deflated.zip"
    payload = bytes(range(256)) * 8
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/b", payload)
    (entry,) = _located(path).values()
    assert entry.compressed
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_member(fd, entry) == payload
        with pytest.raises(ZipFormatError, match="CRC"):
            read_member(fd, entry._replace(crc=entry.crc ^ 1))
    finally:
        os.close(fd)
