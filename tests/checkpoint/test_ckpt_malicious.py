"""Hostile pickles are read without executing anything; every global they name is recorded."""

from __future__ import annotations

import copyreg
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import entry_name, rewrite_zip

from bnaudit.checkpoint import Placeholder, load_checkpoint
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.unpickler import inert_load


class Reduce:
    """Pickles as ``func(*args)``: what an attacker's object looks like to the unpickler."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


class EvilNewObj:
    """Pickles through NEWOBJ + BUILD; its __setstate__ would create the marker if the class were imported."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return copyreg.__newobj__, (type(self),), {"marker": self.marker}  # type: ignore[attr-defined]

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["marker"]).write_text("pwned")


def _python(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, qualified name of the dangerous global it must record)."""
    m = str(marker)
    touch = f"touch {m}".encode()
    return {
        "os.system-p0": (b"cos\nsystem\n(S'" + touch + b"'\ntR.", "os.system"),
        "posix.system-p2": (
            pickle.dumps(Reduce(os.system, f"touch {m}"), protocol=2),
            f"{os.system.__module__}.system",
        ),
        "posix.system-p5": (
            pickle.dumps(Reduce(os.system, f"touch {m}"), protocol=5),
            f"{os.system.__module__}.system",
        ),
        "builtins.exec": (pickle.dumps(Reduce(exec, _python(marker)), protocol=4), "builtins.exec"),
        "builtins.eval-p3": (pickle.dumps(Reduce(eval, _python(marker)), protocol=3), "builtins.eval"),
        "subprocess.Popen": (
            pickle.dumps(Reduce(subprocess.Popen, ["touch", m]), protocol=4),
            "subprocess.Popen",
        ),
        "__builtin__.eval-p0": (
            b"c__builtin__\neval\n(V" + _python(marker).encode() + b"\ntR.",
            "builtins.eval",
        ),
        "__builtin__.eval-p2": (
            b"\x80\x02c__builtin__\neval\nX"
            + len(_python(marker)).to_bytes(4, "little")
            + _python(marker).encode()
            + b"\x85R.",
            "builtins.eval",
        ),
        "getattr-chain": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'" + touch + b"'\ntR.",
            "builtins.__import__",
        ),
        "newobj-evil": (pickle.dumps(EvilNewObj(m), protocol=2), f"{__name__}.EvilNewObj"),
        "copy_reg-p0": (
            b"ccopy_reg\n_reconstructor\n(c" + __name__.encode() + b"\nEvilNewObj\nc__builtin__\nobject\n"
            b"NtR(dS'marker'\nS'" + m.encode() + b"'\nsb.",
            "copyreg._reconstructor",
        ),
        "runpy": (b"crunpy\n_run_code\n(V" + _python(marker).encode() + b"\n(dtR.", "runpy._run_code"),
    }


@pytest.mark.parametrize("name", list(_payloads(Path("x"))))
def test_payload_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "marker"
    data, dangerous = _payloads(marker)[name]
    obj, refs, _ = inert_load(data, display="evil.pkl", source="evil.pkl")
    assert not marker.exists()
    assert dangerous in {r.qualname for r in refs}
    assert isinstance(obj, Placeholder)


def test_payload_as_plain_pickle_file(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"x": Reduce(os.system, f"touch {marker}")}, protocol=2))
    ckpt = load_checkpoint(path)
    assert ckpt.format == "pickle" and not marker.exists()
    assert f"{os.system.__module__}.system" in {g.qualname for g in ckpt.globals}
    call = ckpt.root["x"]
    assert call.qualname.endswith(".system") and call.args == (f"touch {marker}",)


def test_payload_next_to_a_real_state_dict_in_torch_zip(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "ckpt.pt"
    sd = torch.nn.BatchNorm1d(3).state_dict()
    torch.save(
        {
            "state_dict": sd,
            "hook": Reduce(os.system, f"touch {marker}"),
            "hook2": Reduce(subprocess.Popen, ["touch", str(marker)]),
        },
        path,
    )
    ckpt = load_checkpoint(path)
    assert not marker.exists()
    assert [s.name for s in ckpt.state_dicts] == ["state_dict"]
    names = {g.qualname for g in ckpt.globals}
    assert {f"{os.system.__module__}.system", "subprocess.Popen"} <= names
    assert all(g.source.endswith("data.pkl") for g in ckpt.globals)


def test_data_pkl_replaced_by_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path, evil = tmp_path / "ckpt.pt", tmp_path / "evil.pt"
    torch.save({"x": torch.ones(2)}, path)
    payload = pickle.dumps(Reduce(exec, _python(marker)), protocol=2)
    rewrite_zip(path, evil, {entry_name(path, "/data.pkl"): payload})
    ckpt = load_checkpoint(evil)
    assert not marker.exists()
    assert "builtins.exec" in {g.qualname for g in ckpt.globals}
    assert ckpt.state_dicts == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unknown_tensor_rebuild_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "q.pt"
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"q": q, "w": torch.ones(2), "sparse": torch.eye(3).to_sparse()}, path)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.root["q"], Placeholder) and isinstance(ckpt.root["sparse"], Placeholder)
    assert any("_rebuild_qtensor" in w for w in ckpt.warnings)
    assert any("_rebuild_sparse_tensor" in w for w in ckpt.warnings)
    assert read_tensor(ckpt.root["w"]).tolist() == [1.0, 1.0]


class MyTensor(torch.Tensor):
    """A tensor subclass: torch saves it through _rebuild_from_type_v2."""


def test_tensor_subclass_is_a_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "sub.pt"
    torch.save({"t": torch.ones(2).as_subclass(MyTensor), "plain": torch.ones(2)}, path)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.root["t"], Placeholder)
    assert any("subclass" in w for w in ckpt.warnings)


def test_plain_tensor_with_python_state_is_unwrapped(tmp_path: Path) -> None:
    t = torch.arange(3.0)
    t.note = "hello"  # type: ignore[attr-defined]
    path = tmp_path / "state.pt"
    torch.save({"t": t}, path)
    ckpt = load_checkpoint(path)
    assert "torch._tensor._rebuild_from_type_v2" in {g.qualname for g in ckpt.globals}
    assert read_tensor(ckpt.root["t"]).tolist() == [0.0, 1.0, 2.0]
    assert ckpt.warnings == []


def test_deep_nesting_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.pkl"
    depth = 100_000
    path.write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    ckpt = load_checkpoint(path)
    assert ckpt.format == "pickle" and ckpt.state_dicts == []
