"""Zip members located as torch.load's reader (miniz) locates them; where zipfile would read another
member, the archive is an ``ambiguous-archive`` error and every pickle either reader reaches is scanned.

Every hostile file here is built from a real torch.save archive, and each is proved to run its payload
(touching a marker in the test's folder) under the real torch.load before bnaudit is asked about it.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests.checkpoint.torch_load_proof import payload, runs_under_torch_load
from tests.conftest import run_cli

_EOCD = b"PK\x05\x06"


def _members(tmp_path: Path) -> list[tuple[str, bytes]]:
    clean = tmp_path / "clean.pt"
    torch.save(OrderedDict([("bn.running_mean", torch.zeros(3)), ("bn.running_var", torch.ones(3))]), clean)
    with zipfile.ZipFile(clean) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names these tests want
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return out.getvalue()


def _with_pickle(members, evil: bytes, *, name: str | None = None, at: int = 1, keep: bool = True):
    """The members with a payload data.pkl (named ``name``) inserted at ``at``, before the archive's own
    (or instead of it)."""
    pkl = next(n for n, _ in members if n.endswith("/data.pkl"))
    rest = [(n, d) for n, d in members if keep or n != pkl]
    return [*rest[:at], (name or pkl, evil), *rest[at:]]


def _two_directories(members, evil: bytes) -> bytes:
    """A payload archive, then the clean archive whose end record points at the first one's directory:
    torch's reader reads the first directory, zipfile (shifting offsets) the second."""
    pkl = next(n for n, _ in members if n.endswith("/data.pkl"))
    first = _zip([(n, evil if n == pkl else d) for n, d in members])
    second = bytearray(_zip(members))
    first_dir = struct.unpack_from("<L", first, first.rfind(_EOCD) + 16)[0]
    struct.pack_into("<L", second, second.rfind(_EOCD) + 16, first_dir)
    return first + bytes(second)


def _short_count(members, evil: bytes) -> bytes:
    """The payload data.pkl first, the clean one last, and an end record counting one entry less: torch's
    reader never sees the last record, zipfile reads it and picks it."""
    pkl = next((n, d) for n, d in members if n.endswith("/data.pkl"))
    data = bytearray(_zip([(pkl[0], evil), *(m for m in members if m != pkl), pkl]))
    eocd = data.rfind(_EOCD)
    count = struct.unpack_from("<H", data, eocd + 10)[0]
    struct.pack_into("<HH", data, eocd + 8, count - 1, count - 1)
    return bytes(data)


def _build(case: str, members, evil: bytes, at: int = 1) -> bytes:
    prefix = next(n for n, _ in members).split("/")[0]
    if case == "Data.pkl-instead":
        return _zip(_with_pickle(members, evil, name=f"{prefix}/Data.pkl", keep=False))
    if case == "Data.pkl-next-to-data.pkl":
        return _zip(_with_pickle(members, evil, name=f"{prefix}/Data.pkl", at=at))
    if case == "duplicate-data.pkl":
        return _zip(_with_pickle(members, evil, at=at))
    if case == "two-directories":
        return _two_directories(members, evil)
    return _short_count(members, evil)


def _executing(case: str, members, marker: Path, path: Path) -> Path:
    """The case written to ``path``, proved to run under torch.load. Of two records that torch's reader
    matches, which one its binary search lands on depends on where they lie, so for those cases the
    payload is moved along the directory until torch.load runs it."""
    for at in range(1, len(members) + 1):
        path.write_bytes(_build(case, members, payload(marker), at))
        if runs_under_torch_load(path, marker):
            return path
    raise AssertionError(f"torch.load runs no arrangement of {case}")


CASES = [
    "Data.pkl-instead",
    "Data.pkl-next-to-data.pkl",
    "duplicate-data.pkl",
    "two-directories",
    "short-count",
]


@pytest.mark.parametrize("case", CASES)
def test_a_pickle_torch_reads_where_zipfile_reads_another_is_flagged(tmp_path, case):
    marker = tmp_path / "pwned"
    evil = _executing(case, _members(tmp_path), marker, tmp_path / "evil.pt")
    result = run_cli("inspect", str(evil), "--format", "json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    findings = json.loads(result.stdout)["findings"]
    kinds = {f["kind"] for f in findings}
    assert {"ambiguous-archive", "unsafe-pickle"} <= kinds, findings
    unsafe = " ".join(f["message"] for f in findings if f["kind"] == "unsafe-pickle")
    assert "system" in unsafe


def test_the_ambiguity_names_what_differs(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_build("Data.pkl-next-to-data.pkl", _members(tmp_path), payload(tmp_path / "m")))
    result = run_cli("inspect", str(evil), "--format", "json")
    (finding,) = [f for f in json.loads(result.stdout)["findings"] if f["kind"] == "ambiguous-archive"]
    assert finding["severity"] == "error"
    assert "Data.pkl" in finding["message"] and "ignoring case" in finding["message"]


def _data_pkl(path: Path, obj: object) -> tuple[list[tuple[str, bytes]], bytes]:
    torch.save(obj, path)
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    return members, next(d for n, d in members if n.endswith("/data.pkl"))


@pytest.mark.parametrize("command", ["compare", "average"])
def test_compare_and_average_flag_it_too_and_write_nothing(tmp_path, command):
    from tests.conftest import ShellPayload

    sd = OrderedDict([("bn.running_mean", torch.zeros(3)), ("bn.running_var", torch.ones(3))])
    members, _ = _data_pkl(tmp_path / "ckpt_rank0.pt", {"state_dict": sd, "epoch": 1})
    # The same state dict, its epoch a payload: the pickle torch.load runs, zipfile never reads.
    _, evil = _data_pkl(tmp_path / "evil_only.pt", {"state_dict": sd, "epoch": ShellPayload(tmp_path / "m")})
    (tmp_path / "ckpt_rank1.pt").write_bytes(_two_directories(members, evil))
    assert runs_under_torch_load(tmp_path / "ckpt_rank1.pt", tmp_path / "m")
    out = ["-o", str(tmp_path / "avg.pt")] if command == "average" else []
    ranks = [str(tmp_path / "ckpt_rank0.pt"), str(tmp_path / "ckpt_rank1.pt")]
    result = run_cli(command, *ranks, *out, "--format", "json")
    assert result.returncode == 1, result.stderr
    assert "ambiguous-archive" in result.stdout and not (tmp_path / "avg.pt").exists()


def test_a_clean_torch_save_is_not_ambiguous(tmp_path):
    rezipped = tmp_path / "rezipped.pt"
    rezipped.write_bytes(_zip(_members(tmp_path)))  # _members leaves torch.save's own file as clean.pt
    for path in (tmp_path / "clean.pt", rezipped):
        result = run_cli("inspect", str(path), "--format", "json")
        assert result.returncode == 0, result.stderr
        assert "ambiguous-archive" not in result.stdout


def test_a_local_header_naming_another_entry_is_read_as_torch_reads_it(tmp_path):
    marker = tmp_path / "pwned"
    members = _members(tmp_path)
    pkl = next(n for n, _ in members if n.endswith("/data.pkl"))
    data = bytearray(_zip([(n, payload(marker) if n == pkl else d) for n, d in members]))
    local = data.find(pkl.encode())  # the local header's copy of the name comes before the central one
    data[local + len(pkl) - len("data.pkl")] = ord("D")  # zipfile refuses the entry; torch reads it
    evil = tmp_path / "evil.pt"
    evil.write_bytes(bytes(data))
    with zipfile.ZipFile(evil) as zf, pytest.raises(zipfile.BadZipFile):
        zf.read(pkl)
    assert runs_under_torch_load(evil, marker)
    result = run_cli("inspect", str(evil), "--format", "json")
    assert result.returncode == 1, result.stderr
    kinds = {f["kind"] for f in json.loads(result.stdout)["findings"]}
    assert {"ambiguous-archive", "unsafe-pickle"} <= kinds
