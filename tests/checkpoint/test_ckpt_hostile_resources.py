"""Hostile structure cannot exhaust time or memory: each file is built here from pickle opcodes or zipfile,
and the CLI must answer in well under 10 s, under 512 MiB of peak memory, without a traceback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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
