"""A dangerous global a pickle references is reported even when the pickle is corrupt or truncated after it.

The files are real: torch.save zips whose data.pkl is patched to name os.system and then cut or broken, and
plain pickles likewise. The CLI must exit 1 with the unsafe-pickle message first and the parse error second.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests.checkpoint.ckpt_helpers import rewrite_zip
from tests.conftest import run_cli

# GLOBAL os.system then POP: the reference a hostile pickle makes before it calls the function.
_OS_SYSTEM = b"cos\nsystem\n0"
_EVAL = b"c__builtin__\neval\n0"


def _state() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [("bn.running_mean", torch.zeros(4)), ("bn.running_var", torch.ones(4)), ("bn.weight", torch.ones(4))]
    )


def _broken(pickle: bytes, dangerous: bytes, how: str) -> bytes:
    """``pickle`` with ``dangerous`` inserted after its PROTO opcode, then truncated or given a bad opcode."""
    assert pickle[:1] == b"\x80"
    patched = pickle[:2] + dangerous + pickle[2:]
    if how == "truncated":
        return patched[: len(pickle[:2] + dangerous) + (len(pickle) - 2) // 2]
    return pickle[:2] + dangerous + b"\xff" + pickle[2:]  # 0xff is no opcode


def _torch_zip(tmp_path: Path, name: str, dangerous: bytes, how: str) -> Path:
    clean = tmp_path / f"clean_{name}"
    torch.save(_state(), clean)
    with zipfile.ZipFile(clean) as zf:
        entry = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        original = zf.read(entry)
    path = tmp_path / name
    rewrite_zip(clean, path, {entry: _broken(original, dangerous, how)})
    return path


def _plain(tmp_path: Path, name: str, dangerous: bytes, how: str) -> Path:
    import pickle

    path = tmp_path / name
    path.write_bytes(
        _broken(pickle.dumps({"epoch": 3, "lr": 0.1, "names": ["a", "b"]}, protocol=2), dangerous, how)
    )
    return path


def _assert_unsafe_then_corrupt(result, qualname: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "unsafe-pickle" in lines[0] and f"'{qualname}'" in lines[0]
    assert "corrupt or truncated" in lines[1]


@pytest.mark.parametrize("how", ["truncated", "bad-opcode"])
@pytest.mark.parametrize("make", [_torch_zip, _plain], ids=["torch-zip", "plain-pickle"])
def test_inspect_reports_a_dangerous_global_of_a_broken_pickle(tmp_path, make, how):
    path = make(tmp_path, "evil.pt", _OS_SYSTEM, how)
    _assert_unsafe_then_corrupt(run_cli("inspect", str(path)), "os.system")


def test_python2_spelling_of_eval_is_reported_too(tmp_path):
    path = _torch_zip(tmp_path, "evil.pt", _EVAL, "truncated")
    _assert_unsafe_then_corrupt(run_cli("inspect", str(path)), "builtins.eval")


@pytest.mark.parametrize("make", [_torch_zip, _plain], ids=["torch-zip", "plain-pickle"])
def test_a_broken_pickle_without_dangerous_globals_stays_an_input_error(tmp_path, make):
    harmless = b"ccollections\nOrderedDict\n0"
    path = make(tmp_path, "broken.pt", harmless, "truncated")
    result = run_cli("inspect", str(path))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "corrupt or truncated" in result.stderr and "unsafe-pickle" not in result.stderr


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_compare_reports_the_dangerous_global_of_a_broken_rank(tmp_path, bad_rank):
    good = tmp_path / f"model_rank{1 - bad_rank}.pt"
    torch.save(_state(), good)
    _torch_zip(tmp_path, f"model_rank{bad_rank}.pt", _OS_SYSTEM, "truncated")
    result = run_cli("compare", str(tmp_path / "model_rank0.pt"), str(tmp_path / "model_rank1.pt"))
    _assert_unsafe_then_corrupt(result, "os.system")


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_average_refuses_a_broken_rank_with_a_dangerous_global(tmp_path, bad_rank):
    good = tmp_path / f"model_rank{1 - bad_rank}.pt"
    torch.save(_state(), good)
    _torch_zip(tmp_path, f"model_rank{bad_rank}.pt", _OS_SYSTEM, "bad-opcode")
    out = tmp_path / "avg.pt"
    result = run_cli(
        "average", str(tmp_path / "model_rank0.pt"), str(tmp_path / "model_rank1.pt"), "-o", str(out)
    )
    _assert_unsafe_then_corrupt(result, "os.system")
    assert not out.exists() and not list(tmp_path.glob("avg*"))
