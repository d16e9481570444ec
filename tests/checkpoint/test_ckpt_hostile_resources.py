"""Hostile structure cannot exhaust time or memory: each file is built here from pickle opcodes or zipfile,
and the CLI must answer in well under 10 s, under 512 MiB of peak memory, without a traceback."""

from __future__ import annotations

import io
import os
import pickle
import socket
import zipfile
from pathlib import Path

import pytest

from bnaudit.checkpoint.unpickler import inert_load
from tests.checkpoint.hostile_helpers import run_bounded


def _assert_refused(result, *words: str) -> None:
    result.assert_bounded()
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# ----- non-regular files --------------------------------------------------------------------------------
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    _assert_refused(run_bounded("inspect", str(fifo)), "FIFO", "not a regular file")


def test_a_character_device_is_refused_before_it_is_read() -> None:
    # /dev/zero never ends: read, it would be sniffed as "an unknown format" only after a read.
    _assert_refused(run_bounded("inspect", "/dev/zero"), "character device")


def test_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        _assert_refused(run_bounded("inspect", str(path)), "socket")
    finally:
        server.close()


def test_compare_refuses_a_fifo_rank(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m_rank0.pt")
    os.mkfifo(tmp_path / "m_rank1.pt")
    _assert_refused(
        run_bounded("compare", str(tmp_path / "m_rank0.pt"), str(tmp_path / "m_rank1.pt")), "FIFO"
    )


# ----- declared lengths ---------------------------------------------------------------------------------
_FOUR_GIB = (4 << 30).to_bytes(8, "little")
_HUGE_CLAIMS = {
    "BYTEARRAY8": b"\x80\x05\x96" + _FOUR_GIB + b".",  # 12 bytes asking for a zeroed 4 GiB bytearray
    "BINBYTES8": b"\x80\x04\x8e" + _FOUR_GIB + b".",
    "BINUNICODE8": b"\x80\x04\x8d" + _FOUR_GIB + b".",
    "FRAME": b"\x80\x04\x95" + _FOUR_GIB + b"N.",
    "BINBYTES": b"\x80\x03B\xff\xff\xff\xff.",
}


def _torch_zip_with_pickle(tmp_path: Path, data_pkl: bytes, compress: bool = False) -> Path:
    path = tmp_path / "model.pt"
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")
    return path


@pytest.mark.parametrize("opcode", sorted(_HUGE_CLAIMS))
@pytest.mark.parametrize("container", ["plain-pickle", "torch-zip"])
def test_a_declared_length_beyond_the_input_is_refused_before_allocating(tmp_path, opcode, container):
    data = _HUGE_CLAIMS[opcode]
    if container == "plain-pickle":
        path = tmp_path / "model.pkl"
        path.write_bytes(data)
    else:
        path = _torch_zip_with_pickle(tmp_path, data)
    _assert_refused(run_bounded("inspect", str(path)), "corrupt or truncated", "claims")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x80\x04\x8e" + (3).to_bytes(8, "little") + b"abc.", b"abc"),
        (b"\x80\x05\x96" + (2).to_bytes(8, "little") + b"hi.", bytearray(b"hi")),
        (b"\x80\x04\x8d" + (2).to_bytes(8, "little") + "é".encode() + b".", "é"),
        (b"\x80\x04\x95" + (2).to_bytes(8, "little") + b"N.", None),
        (b"\x80\x03B" + (1).to_bytes(4, "little") + b"z.", b"z"),
        (b"\x80\x03X" + (1).to_bytes(4, "little") + b"z.", "z"),
    ],
)
def test_lengths_that_fit_are_read_as_before(data, expected):
    obj, _, _ = inert_load(io.BytesIO(data), display="x", source="x")  # a stream: the pure-Python unpickler
    assert obj == expected and type(obj) is type(expected)


def test_a_real_protocol5_pickle_streams_through_the_checked_opcodes(tmp_path):
    obj = {"b": b"x" * 70_000, "a": bytearray(b"y" * 300), "s": "z" * 70_000}
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=5))
    with open(path, "rb") as f:
        got, _, _ = inert_load(f, display="p", source="p")
    assert got == obj


# ----- zip bombs ----------------------------------------------------------------------------------------
def _bomb(tmp_path: Path, entry: str, inflated: int) -> Path:
    """A torch zip whose ``entry`` is deflated zeros (a pickle of 0x00 bytes, which is no opcode)."""
    path = tmp_path / "bomb.pt"
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        if entry != "archive/data.pkl":
            zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        with zf.open(entry, "w", force_zip64=True) as member:
            for _ in range(inflated // len(chunk)):
                member.write(chunk)
    return path


@pytest.mark.parametrize("entry", ["archive/data.pkl", "archive/byteorder"])
def test_a_zip_bomb_entry_stops_at_the_inflate_budget(tmp_path, entry):
    path = _bomb(tmp_path, entry, 768 << 20)  # under the 1 GiB pickle limit, a few hundred kB on disk
    assert path.stat().st_size < 4 << 20
    _assert_refused(run_bounded("inspect", str(path)), "zip bomb", "byte budget", entry)


def test_a_compressed_pickle_within_the_budget_is_read(tmp_path):
    data = pickle.dumps({"epoch": 7, "note": "x" * 100_000}, protocol=2)
    path = _torch_zip_with_pickle(tmp_path, data, compress=True)
    result = run_bounded("inspect", str(path))
    result.assert_bounded()
    assert "zip bomb" not in result.stderr and "corrupt" not in result.stderr
