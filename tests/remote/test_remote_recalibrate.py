"""recalibrate with a checkpoint behind a URL (a single file over the counting HTTP server and over moto S3,
a DCP folder over S3), the output local: the statistics written equal those of the same run on the local
copy, and the float64 reference of tests/repair/test_recalibrate.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.checkpoint.test_dcp import save_dcp
from tests.recal_helpers.models import make_convnet
from tests.remote.servers import http_server, s3_run_bucket
from tests.remote.test_remote_inputs import _normal, _report, bnaudit
from tests.repair.test_folder_repairs import _dcp_load, digests
from tests.repair.test_recalibrate import SPEC, _assert_exact

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
CALIBRATION = ("--model", SPEC.model, "--data", SPEC.data)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recal")
    state = make_convnet().state_dict()
    torch.save(state, root / "convnet.pt")
    save_dcp(root / "convnet_dcp", {"model": state})
    return root


def _recalibrate(source: str, out: Path, env: dict[str, str] | None = None) -> dict:
    """The JSON report of one run, the output's folder written as OUT (each run writes its own folder)."""
    out.parent.mkdir(exist_ok=True)
    result = bnaudit("recalibrate", source, *CALIBRATION, "-o", str(out), "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(json.dumps(_report(result)).replace(str(out.parent), "OUT"))


def _same_as_local(served: Path, remote: str, prefix: str, tmp_path: Path, env=None) -> None:
    local_report = _recalibrate(str(served / "convnet.pt"), tmp_path / "local" / "out.pt")
    remote_report = _recalibrate(remote, tmp_path / "remote" / "out.pt", env)
    assert _normal(remote_report, prefix) == _normal(local_report, served)
    local, got = torch.load(tmp_path / "local" / "out.pt"), torch.load(tmp_path / "remote" / "out.pt")
    assert local.keys() == got.keys()
    for key, value in local.items():
        assert torch.equal(got[key], value), key
    _assert_exact(got)
    side = json.loads((tmp_path / "remote" / "out.pt.bnaudit.json").read_text())
    assert side["output"]["path"] == str(tmp_path / "remote" / "out.pt")


def test_recalibrate_a_file_over_http(served, tmp_path) -> None:
    with http_server(served) as (base, counts):
        _same_as_local(served, f"{base}/convnet.pt", base, tmp_path)
        assert counts.bytes["convnet.pt"] > 0


@pytest.fixture(scope="module")
def s3(served: Path) -> Iterator[dict[str, str]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    args = [str(served / "convnet.pt"), str(served / "convnet_dcp")]
    with s3_run_bucket(args) as env:
        yield env


def test_recalibrate_a_file_over_s3(served, s3, tmp_path) -> None:
    _same_as_local(served, "s3://bucket/run/convnet.pt", "s3://bucket/run", tmp_path, s3)


def test_recalibrate_a_dcp_folder_over_s3_into_a_local_folder(served, s3, tmp_path) -> None:
    local_report = _recalibrate(str(served / "convnet_dcp"), tmp_path / "local" / "dcp")
    remote_report = _recalibrate("s3://bucket/run/convnet_dcp", tmp_path / "remote" / "dcp", s3)
    assert _normal(remote_report, "s3://bucket/run") == _normal(local_report, served)
    assert digests(tmp_path / "remote" / "dcp") == digests(tmp_path / "local" / "dcp")
    _assert_exact(_dcp_load(tmp_path / "remote" / "dcp", {"model": make_convnet().state_dict()})["model"])
