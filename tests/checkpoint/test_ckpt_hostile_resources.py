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


# ----- exponential structures in messages ---------------------------------------------------------------
def _memo(op: bytes, index: int) -> bytes:
    return op + bytes([index])  # BINPUT (q) / BINGET (h): one-byte memo indices


def _shared_list_dag(levels: int) -> bytes:
    """Opcodes leaving on the stack a list whose every level holds the level below twice (through the memo):
    a few hundred bytes whose expansion (repr, a naive walk) has 2**levels leaves."""
    out = [b"]", _memo(b"q", 0)]  # EMPTY_LIST, BINPUT 0
    for level in range(1, levels):
        # POP the level below (it stays in the memo), then MARK, BINGET it twice, LIST, BINPUT.
        out += [b"0(", _memo(b"h", level - 1), _memo(b"h", level - 1), b"l", _memo(b"q", level)]
    return b"".join(out)


def _persistent_dag_pickle() -> bytes:
    # {"state": <persistent id that is the DAG>}; BINPERSID asks the unpickler to describe the id.
    return b"\x80\x02}(X\x05\x00\x00\x00state" + _shared_list_dag(60) + b"Qu."


def _tensor_with_dag_size() -> bytes:
    """torch._utils._rebuild_tensor_v2(<storage>, 0, <DAG size>, (1,)): an invalid size, reported."""
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    args = b"(" + storage + b"K\x00" + _shared_list_dag(60) + b"K\x01\x85" + b"t"
    return b"\x80\x02}X\x04\x00\x00\x00bn.wctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


@pytest.mark.parametrize("container", ["plain-pickle", "torch-zip"])
def test_a_persistent_id_dag_is_summarised_not_expanded(tmp_path, container):
    data = _persistent_dag_pickle()
    assert len(data) < 1024
    if container == "plain-pickle":
        path = tmp_path / "model.pkl"
        path.write_bytes(data)
    else:
        path = _torch_zip_with_pickle(tmp_path, data)
    result = run_bounded("inspect", str(path))
    result.assert_bounded()
    assert result.returncode in (0, 1), result.stderr
    assert "persistent id" in result.stderr and len(result.stderr) < 2000


def test_an_invalid_tensor_size_that_is_a_dag_is_summarised(tmp_path):
    path = _torch_zip_with_pickle(tmp_path, _tensor_with_dag_size())
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/data/0", bytes(16))
    result = run_bounded("inspect", str(path))
    _assert_refused(result, "invalid offset, size or stride", "<list of 2>")
    assert len(result.stderr) < 1000


def test_summary_bounds_every_kind_of_value():
    from bnaudit.checkpoint.types import Placeholder
    from bnaudit.checkpoint.unpickler_globals import summary

    dag: list = []
    for _ in range(200):
        dag = [dag, dag]
    assert summary(dag) == "[[<list of 2>, <list of 2>], [<list of 2>, <list of 2>]]"
    assert summary(tuple(range(10))) == "(0, 1, 2, 3, ...)"
    assert summary({"a": 1}) == "{'a': 1}"
    assert summary("x" * 100) == repr("x" * 40) + "..."
    assert summary(1 << 10_000) == "<int of 10001 bits>"
    assert summary(Placeholder("os", "system")) == "<os.system>"
    assert summary(3) == "3" and summary(None) == "None"


# ----- graph walks --------------------------------------------------------------------------------------
def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()  # BINUNICODE


def _module_dag_pickle(levels: int) -> bytes:
    """torch.save(model) of a module whose every level's ``_modules`` names the next level twice (through
    the memo): 2**levels paths to the leaf in a few kB."""
    cls = 255  # memo slot of the module class
    out = [b"\x80\x02ctorch.nn.modules.container\nSequential\n", _memo(b"q", cls), b"0"]
    for level in reversed(range(levels)):
        children = b""
        if level < levels - 1:
            child = _memo(b"h", level + 1)
            children = b"(" + _text("a") + child + _text("b") + child + b"u"
        state = b"}(" + _text("_parameters") + b"}" + _text("_buffers") + b"}" + _text("_modules") + b"}"
        out += [_memo(b"h", cls), b")\x81", state, children, b"ub", _memo(b"q", level)]
        if level:
            out.append(b"0")
    return b"".join(out) + b"."


def test_a_module_dag_is_walked_once_per_module(tmp_path):
    data = _module_dag_pickle(64)
    assert len(data) < 8192
    path = _torch_zip_with_pickle(tmp_path, data)
    result = run_bounded("inspect", str(path))
    result.assert_bounded()
    assert result.returncode in (0, 1), result.stderr


def test_a_shared_container_dag_is_searched_once(tmp_path):
    # [[[...]]]: each level a list of 200 references to the level below, four levels: 1.6e9 paths.
    out = [b"\x80\x02}q\x00"]
    for level in range(1, 5):
        out += [b"0(", _memo(b"h", level - 1) * 200, b"l", _memo(b"q", level)]
    path = tmp_path / "model.pkl"
    path.write_bytes(b"".join(out) + b".")
    result = run_bounded("inspect", str(path))
    result.assert_bounded()
    assert result.returncode in (0, 1), result.stderr


def test_a_shared_module_is_flattened_at_its_first_place():
    from bnaudit.checkpoint.discover import module_state_dict
    from bnaudit.checkpoint.types import Placeholder, StorageRef, TensorRef

    tensor = TensorRef(StorageRef(Path("x"), "0", 0, 4, "float32"), "float32", (1,), (1,), 0, False)
    leaf = Placeholder("torch.nn", "BatchNorm2d")
    leaf.state = {"_parameters": {"weight": tensor}, "_buffers": {}, "_modules": {}}
    top = Placeholder("torch.nn", "Sequential")
    top.state = {"_parameters": {}, "_buffers": {}, "_modules": {"a": leaf, "b": leaf}}
    assert module_state_dict(top) == {"a.weight": tensor}


# ----- many globals -------------------------------------------------------------------------------------
def test_three_hundred_thousand_distinct_globals_stay_bounded(tmp_path):
    out = [b"\x80\x02"]
    out += [b"cmod%d\nf\n0" % i for i in range(300_000)]  # GLOBAL then POP, 300,000 times
    path = tmp_path / "model.pkl"
    path.write_bytes(b"".join(out) + b"ccollections\nOrderedDict\n)R.")
    result = run_bounded("inspect", str(path))
    result.assert_bounded()
    assert result.returncode in (0, 1), result.stderr
    assert "more than 10000 distinct globals" in result.stderr


def test_unknown_globals_past_the_cap_are_counted_and_every_dangerous_one_is_listed():
    from bnaudit.bn.pickle_policy import MAX_LISTED_GLOBALS, pickle_findings
    from bnaudit.checkpoint.types import GlobalRef
    from bnaudit.report.model import FindingKind, Severity

    refs = [GlobalRef(f"mod{i}", "f", "data.pkl") for i in range(MAX_LISTED_GLOBALS + 50)]
    refs += [GlobalRef("os", "system", "data.pkl"), GlobalRef("posix", "system", "data.pkl")]
    findings = pickle_findings(refs, "x.pt")
    unsafe = [f for f in findings if f.kind is FindingKind.UNSAFE_PICKLE]
    assert sorted(f.tensor for f in unsafe) == ["os.system", "posix.system"]
    warned = [f for f in findings if f.severity is Severity.WARN]
    assert len(warned) == MAX_LISTED_GLOBALS + 1
    assert "50 more unknown globals" in warned[-1].message
