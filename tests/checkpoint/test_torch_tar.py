"""The pre-1.0 tar checkpoint: every pickle torch.load unpickles from its members is scanned.

torch.save no longer writes the format, so the files are written here by hand following torch.load's
reader (``_legacy_load.legacy_load``), and each is proved to load (or to run its payload) under torch.load.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.checkpoint.torch_load_proof import payload, runs_under_torch_load
from tests.conftest import run_cli

VALUES = [0.5, -1.0, 2.0]
PARTS = ["storage count", "storage", "storage views", "tensor count", "tensor", "pickle"]


class _Tensor:
    """Pickled as the persistent id of tensor ``key``, as the tar format's writer named tensors."""

    def __init__(self, key: int) -> None:
        self.key = key


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> str | None:
        return str(obj.key) if isinstance(obj, _Tensor) else None


def _main_pickle() -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump({"bn.running_mean": _Tensor(1), "bn.running_var": _Tensor(1)})
    return out.getvalue()


def _members(evil: bytes | None = None, where: str = "") -> dict[str, bytes]:
    """The three members; the pickle named by ``where`` replaced by ``evil``."""

    def p(part: str, obj: object) -> bytes:
        return evil if part == where and evil is not None else pickle.dumps(obj, protocol=2)

    storages = (p("storage count", 1) + p("storage", (0, "cpu", torch.FloatStorage))
                + struct.pack("<q3f", 3, *VALUES) + p("storage views", []))  # fmt: skip
    tensors = (p("tensor count", 1) + p("tensor", (1, 0, torch.FloatTensor))
               + struct.pack("<i4xqqq", 1, 3, 1, 0))  # fmt: skip
    main = evil if where == "pickle" and evil is not None else _main_pickle()
    return {"pickle": main, "tensors": tensors, "storages": storages}


def _write(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_torch_loads_the_hand_written_file(tmp_path):
    path = _write(tmp_path / "old.pt", _members())
    code = "import sys, torch; print(torch.load(sys.argv[1], weights_only=False)['bn.running_var'].tolist())"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == VALUES


def test_a_clean_tar_checkpoint_is_read_and_passes(tmp_path):
    path = _write(tmp_path / "old.pt", _members())
    result = run_cli("inspect", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"][0]["format"] == "torch-tar"
    assert not {f["kind"] for f in report["findings"]} & {"unsafe-pickle", "ambiguous-archive"}


@pytest.mark.parametrize("where", PARTS)
def test_a_payload_in_any_pickle_of_the_tar_format_is_unsafe(tmp_path, where):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pt", _members(payload(marker), where))
    assert runs_under_torch_load(path, marker)
    result = run_cli("inspect", str(path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    assert "unsafe-pickle" in result.stdout + result.stderr and "system" in result.stdout + result.stderr


def test_a_missing_member_is_a_one_line_input_error(tmp_path):
    members = _members()
    del members["tensors"]
    result = run_cli("inspect", str(_write(tmp_path / "cut.pt", members)))
    assert result.returncode == 2 and "'tensors' member" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
