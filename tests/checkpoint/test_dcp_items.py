"""Every DCP byte item is scanned as dcp.load reads it (torch.load, weights_only=False), whatever its
first byte and its size; proved against the real loader before bnaudit is asked."""

from __future__ import annotations

import dataclasses
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests.checkpoint.test_dcp import Touch, save_dcp
from tests.checkpoint.torch_load_proof import runs_under_torch_load
from tests.conftest import run_cli


def _replace_item(folder: Path, fqn: str, blob: bytes) -> None:
    """Store ``blob`` as item ``fqn``: appended to its data file, the metadata pointing at it."""
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
    ((index, info),) = [(k, v) for k, v in meta.storage_data.items() if k.fqn == fqn]
    data_file = folder / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(blob)
    meta.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _folder(tmp_path: Path) -> Path:
    sd = OrderedDict([("bn.running_mean", torch.zeros(3)), ("bn.running_var", torch.ones(3))])
    return save_dcp(tmp_path / "ckpt", {"model": sd, "extra": {"epoch": 3}})


@pytest.mark.parametrize("kind", ["protocol-0", "over-64-MiB"])
def test_a_payload_item_of_any_first_byte_or_size_is_unsafe(tmp_path, kind):
    marker = tmp_path / "pwned"
    folder = _folder(tmp_path)
    if kind == "protocol-0":
        blob = pickle.dumps(Touch(marker), protocol=0)
        assert blob[:1] != b"\x80"
    else:
        blob = pickle.dumps([b"\0" * (65 << 20), Touch(marker)], protocol=4)
    _replace_item(folder, "extra.epoch", blob)  # DCP flattens the dict
    assert runs_under_torch_load(folder, marker, dcp=True)
    result = run_cli("inspect", str(folder))
    assert result.returncode == 1, result.stderr
    assert "unsafe-pickle" in result.stdout and "system" in result.stdout and not marker.exists()


def test_a_clean_dcp_folder_has_no_pickle_error(tmp_path):
    result = run_cli("inspect", str(_folder(tmp_path)), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "unsafe-pickle" not in result.stdout and "ambiguous-archive" not in result.stdout
