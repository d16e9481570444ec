"""The opcode pre-scan that lets the C unpickler run only where its memo cannot be blown up.

Both unpicklers must agree: on real pickles and on mutated ones the pre-scan accepts, the C-based inert
unpickler gives what the pure-Python one gives.
"""

from __future__ import annotations

import io
import pickle
import random
import struct
import zipfile
from collections import OrderedDict
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from bnaudit.checkpoint.pickle_scan import c_unpickler_safe
from bnaudit.checkpoint.types import Placeholder, StorageRef
from bnaudit.checkpoint.unpickler import InertUnpickler, _FastInertUnpickler, inert_load
from bnaudit.errors import InputError
from tests.conftest import FIXTURES

SAMPLE: dict[str, Any] = {
    "epoch": 3,
    "lr": 0.1,
    "names": ["a", "bb", "c" * 300],
    "blob": b"\x00\x01" * 200,
    "nested": OrderedDict(x=(1, 2, (3, 4)), y={5, 6}, z=frozenset({7})),
    "big": 2**80,
    "flags": (True, False, None),
}


def _torch_pickle(tmp_path: Path) -> bytes:
    path = tmp_path / "ckpt.pt"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_stdlib_pickles_of_every_protocol_pass(protocol: int) -> None:
    assert c_unpickler_safe(pickle.dumps(SAMPLE, protocol=protocol))


def test_torch_save_pickle_passes(tmp_path: Path) -> None:
    assert c_unpickler_safe(_torch_pickle(tmp_path))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (
            "LONG_BINPUT far beyond the entries stored",
            b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFF0) + b".",
        ),
        ("LONG_BINPUT one past the next index", b"\x80\x02Nq\x00Nr" + struct.pack("<I", 2) + b"."),
        ("PUT far beyond the entries stored", b"Np4000000000\n."),
        ("PUT with a non-decimal index", b"Np-1\n."),
        ("BINUNICODE longer than the pickle", b"\x80\x02X" + struct.pack("<I", 1 << 31) + b"ab."),
        ("BINBYTES8 longer than the pickle", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"."),
        ("negative BINSTRING length", b"T" + struct.pack("<i", -5) + b"."),
        ("FRAME longer than the pickle", b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N."),
        ("unknown opcode", b"\x80\x02\xff."),
        ("no STOP", b"\x80\x02N"),
        ("text opcode without its newline", b"I12"),
        ("empty", b""),
    ],
)
def test_pickles_the_c_unpickler_must_not_see_are_refused(name: str, data: bytes) -> None:
    assert not c_unpickler_safe(data), name


def test_refused_pickle_is_still_read_by_the_pure_python_unpickler() -> None:
    # A sparse memo index is legal pickle; the pure-Python unpickler (dict memo) reads it cheaply.
    index = struct.pack("<I", 0xFFFFFFF0)
    data = b"\x80\x02K\x07r" + index + b"0j" + index + b"."  # BININT1 7, LONG_BINPUT, POP, LONG_BINGET
    assert not c_unpickler_safe(data)
    obj, _, _ = inert_load(data, display="sparse.pkl", source="sparse.pkl")
    assert obj == 7


def _normal(obj: Any) -> Any:
    """A comparable form of an unpickled object (placeholder classes differ per unpickler)."""
    if isinstance(obj, Placeholder):
        return ("placeholder", obj.module, obj.name, _normal(obj.args), _normal(obj.state),
                _normal(obj.items), _normal(obj.dict_items), _normal(obj.kwargs))  # fmt: skip
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return (
            "placeholder-class",
            getattr(obj, "placeholder_module", ""),
            getattr(obj, "placeholder_name", ""),
        )
    if isinstance(obj, dict):
        return (type(obj).__name__, [(_normal(k), _normal(v)) for k, v in obj.items()],
                _normal(vars(obj)) if hasattr(obj, "__dict__") else None)  # fmt: skip
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [_normal(v) for v in obj])
    if isinstance(obj, set | frozenset):
        return (type(obj).__name__, sorted(repr(_normal(v)) for v in obj))
    if is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__, [(f.name, _normal(getattr(obj, f.name))) for f in fields(obj)])
    if isinstance(obj, float) and obj != obj:
        return "nan"
    return obj if isinstance(obj, int | float | str | bytes | bool | type(None)) else repr(type(obj))


def _resolver(key: str, dtype: str, nbytes: int) -> StorageRef:
    return StorageRef(Path("x.pt"), f"archive/data/{key}", 64, nbytes, dtype)


def _outcome(cls: type, data: bytes) -> Any:
    unpickler = cls(io.BytesIO(data), display="m.pt", source="data.pkl", resolver=_resolver)
    try:
        obj = unpickler.load()
    except InputError as exc:
        return ("input-error", str(exc))
    except Exception as exc:  # any other exception is a corrupt pickle to both
        return ("corrupt", type(exc).__name__)
    return (_normal(obj), [g.qualname for g in unpickler.globals], unpickler.warnings)


def _real_pickles(tmp_path: Path) -> list[bytes]:
    out = [_torch_pickle(tmp_path), *(pickle.dumps(SAMPLE, protocol=p) for p in (0, 2, 4, 5))]
    with zipfile.ZipFile(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank0.pt") as zf:
        out.append(zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
    return out


def test_c_and_python_unpicklers_agree_on_real_pickles(tmp_path: Path) -> None:
    for data in _real_pickles(tmp_path):
        assert c_unpickler_safe(data)
        assert _outcome(_FastInertUnpickler, data) == _outcome(InertUnpickler, data)


def test_c_and_python_unpicklers_agree_on_mutated_pickles_the_scan_accepts(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    accepted = 0
    for data in _real_pickles(tmp_path):
        for _ in range(150):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            if not c_unpickler_safe(bytes(mutated)):
                continue
            accepted += 1
            fast = _outcome(_FastInertUnpickler, bytes(mutated))
            slow = _outcome(InertUnpickler, bytes(mutated))
            # Both unpicklers reject corrupt pickles, sometimes with different exception types: what must
            # match is whether the pickle was read and, when it was, what came out.
            if fast[0] in ("corrupt", "input-error") or slow[0] in ("corrupt", "input-error"):
                assert fast[0] in ("corrupt", "input-error") and slow[0] in ("corrupt", "input-error")
            else:
                assert fast == slow
    assert accepted > 300  # most single-byte mutations keep the opcode stream well formed


def test_verdicts_are_reused_for_identical_pickles_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnaudit.checkpoint import pickle_scan

    scanned: list[bytes] = []
    real_scan = pickle_scan._scan

    def counting_scan(data: bytes) -> bool:
        scanned.append(data)
        return real_scan(data)

    monkeypatch.setattr(pickle_scan, "_scan", counting_scan)
    monkeypatch.setattr(pickle_scan, "_VERDICTS", {})
    good = pickle.dumps(SAMPLE, protocol=2)
    bad = b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFF0) + b"."
    assert c_unpickler_safe(good) and c_unpickler_safe(bytes(bytearray(good)))  # equal bytes: one scan
    assert not c_unpickler_safe(bad) and not c_unpickler_safe(bad)
    assert scanned == [good, bad]
    for i in range(pickle_scan._VERDICTS_KEPT + 2):  # the oldest verdicts make room for new ones
        c_unpickler_safe(pickle.dumps(i, protocol=2))
    assert len(pickle_scan._VERDICTS) == pickle_scan._VERDICTS_KEPT and good not in pickle_scan._VERDICTS
