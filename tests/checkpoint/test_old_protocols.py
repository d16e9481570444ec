"""Protocol 0 and 1 pickles are read (inertly) as torch.load reads them: it unpickles any protocol."""

from __future__ import annotations

import pickle

import pytest

from tests.checkpoint.torch_load_proof import runs_under_torch_load
from tests.conftest import ShellPayload, run_cli


@pytest.mark.parametrize("protocol", [0, 1])
@pytest.mark.parametrize("padding", [0, 200_000], ids=["small", "global-past-the-sniffed-bytes"])
def test_an_old_protocol_payload_is_unsafe(tmp_path, protocol, padding):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(["x" * padding, ShellPayload(marker)], protocol=protocol))
    assert runs_under_torch_load(evil, marker)
    result = run_cli("inspect", str(evil))
    assert result.returncode == 1, result.stderr
    assert "unsafe-pickle" in result.stdout and "system" in result.stdout and not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_benign_old_protocol_pickle_passes(tmp_path, protocol):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"epoch": 3, "lr": 0.1, "names": ["a", "b"]}, protocol=protocol))
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "pickle" not in result.stdout.replace("no-batchnorm", "")


def test_text_is_still_refused_as_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\nthis is not a checkpoint\n")
    result = run_cli("inspect", str(path))
    assert result.returncode == 2 and "is a text file" in result.stderr
