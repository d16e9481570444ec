"""Every pickle torch.load unpickles from a legacy file is scanned: magic, protocol, sys_info, main, keys."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests.checkpoint.torch_load_proof import payload, runs_under_torch_load
from tests.conftest import run_cli
from tests.security.corpus.carriers import pickle_spans

_NAMES = ["magic", "protocol", "sys_info", "main", "keys"]


def _legacy(tmp_path: Path, protocol: int = 2) -> Path:
    path = tmp_path / "clean.pt"
    state = OrderedDict([("bn.running_mean", torch.zeros(3)), ("bn.running_var", torch.ones(3))])
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    return path


@pytest.mark.parametrize("which", ["magic", "protocol", "sys_info", "keys"])
def test_a_payload_in_any_legacy_pickle_is_unsafe(tmp_path, which):
    marker = tmp_path / "pwned"
    data = _legacy(tmp_path).read_bytes()
    start, end = pickle_spans(data, len(_NAMES))[_NAMES.index(which)]
    evil = tmp_path / "evil.pt"
    evil.write_bytes(data[:start] + payload(marker) + data[end:])
    assert runs_under_torch_load(evil, marker)
    result = run_cli("inspect", str(evil), "--format", "json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    text = result.stdout + result.stderr
    assert "unsafe-pickle" in text and "system" in text


@pytest.mark.parametrize("protocol", [1, 2, 5])
def test_a_clean_legacy_file_of_any_protocol_is_read_without_pickle_finding(tmp_path, protocol):
    result = run_cli("inspect", str(_legacy(tmp_path, protocol)), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"][0]["format"] == "torch-legacy"
    assert [layer["name"] for layer in report["layers"]] == ["bn"]
    kinds = {f["kind"] for f in report["findings"]}
    assert not kinds & {"unsafe-pickle", "suspicious-pickle", "ambiguous-archive"}
