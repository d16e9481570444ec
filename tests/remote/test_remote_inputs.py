"""compare / average over real servers on 127.0.0.1: an HTTP range server that counts what it serves, and
moto's S3 server. Same report as on local copies; bytes counted by the server; faults exit 2 naming the URL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bnaudit.checkpoint.bytesource import RETRIES
from tests.conftest import FIXTURES, REPO, bn_state
from tests.remote.servers import Served, http_server, s3_run_bucket

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
RANKS = [f"ckpt_rank{r}.pt" for r in range(4)]


def bnaudit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bnaudit", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real ranks (the label-sorted fixture run) and two ranks with a 20 MB tensor beside BatchNorm."""
    folder = tmp_path_factory.mktemp("served")
    for name in RANKS:
        shutil.copy(FIXTURES / "ddp_nosync_sorted" / name, folder / name)
    rng = __import__("numpy").random.default_rng(7)
    for r in range(2):
        state = bn_state({"stem": 8, "head": 16}, rng, shift=0.5 * r)
        state["fc.weight"] = torch.zeros(5_000_000)
        torch.save({"model": state}, folder / f"big_rank{r}.pt")
    return folder


@pytest.fixture(scope="module")
def http(run_folder: Path) -> Iterator[tuple[str, Served]]:
    with http_server(run_folder) as served:
        yield served


def _report(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def _normal(report: dict, prefix: str | Path) -> dict:
    """The report with the inputs' folder or URL prefix cut off and the transfer counts left out."""
    text = json.dumps({k: v for k, v in report.items() if k != "tool"}).replace(f"{prefix}/", "")
    out = json.loads(text)
    out["inputs"] = [{k: v for k, v in i.items() if k != "transfer"} for i in out["inputs"]]
    return out


def test_compare_over_http_equals_local_and_the_server_counts_the_bytes(run_folder, http) -> None:
    base, served = http
    local = _report(bnaudit("compare", *(str(run_folder / n) for n in RANKS), "--format", "json"))
    before = dict(served.bytes)
    remote = _report(bnaudit("compare", f"{base}/ckpt_rank*.pt", "--format", "json"))
    assert _normal(remote, base) == _normal(local, run_folder)
    assert [i["path"] for i in remote["inputs"]] == [f"{base}/{n}" for n in RANKS]
    for entry, name in zip(remote["inputs"], RANKS, strict=True):
        assert entry["transfer"]["bytes_read"] == served.bytes[name] - before.get(name, 0)
        assert entry["transfer"]["requests"] >= 1
    assert all("transfer" not in i for i in local["inputs"])
    threaded = _report(bnaudit("compare", f"{base}/ckpt_rank*.pt", "--format", "json", "--jobs", "4"))
    assert _normal(threaded, base) == _normal(local, run_folder)


def test_only_the_needed_bytes_are_read(run_folder, http) -> None:
    base, served = http
    names = ["big_rank0.pt", "big_rank1.pt"]
    before = {n: served.bytes.get(n, 0) for n in names}
    result = bnaudit("compare", *(f"{base}/{n}" for n in names), "--format", "json")
    assert result.returncode in (0, 1), result.stderr
    for name in names:
        size = (run_folder / name).stat().st_size
        read = served.bytes[name] - before[name]
        assert size > 20_000_000 and 0 < read < size / 100, (name, read, size)


def test_average_reads_a_remote_reference_and_writes_locally(run_folder, http, tmp_path) -> None:
    base, _ = http
    local_out, remote_out = tmp_path / "local.pt", tmp_path / "remote.pt"
    assert bnaudit("average", *(str(run_folder / n) for n in RANKS), "-o", str(local_out)).returncode == 0
    result = bnaudit("average", f"{base}/ckpt_rank*.pt", "-o", str(remote_out))
    assert result.returncode == 0, result.stderr
    assert remote_out.read_bytes() == local_out.read_bytes()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing", "no such object"),
        ("deny", "access denied"),
        ("reset_always", f"the transfer failed {RETRIES} times"),
        ("truncated", "truncated"),
    ],
)
def test_faults_exit_2_naming_the_url(run_folder, http, fault, message) -> None:
    base, served = http
    name = {"missing": "gone_rank1.pt", "truncated": "cut_rank1.pt"}.get(fault, "ckpt_rank1.pt")
    if fault == "truncated":
        data = (run_folder / "ckpt_rank1.pt").read_bytes()
        (run_folder / name).write_bytes(data[: len(data) - 300])
    if fault in ("deny", "reset_always"):
        getattr(served, fault).add(name)
    requests_before = served.requests.get(name, 0)
    try:
        result = bnaudit("compare", f"{base}/ckpt_rank0.pt", f"{base}/{name}")
    finally:
        served.deny.discard(name)
        served.reset_always.discard(name)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{base}/{name}" in lines[0] and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if fault == "reset_always":  # bounded: each attempt is one request, RETRIES of them
        assert served.requests[name] - requests_before == RETRIES


def test_a_reset_mid_read_is_retried(run_folder, http) -> None:
    base, served = http
    served.reset_once.add("ckpt_rank2.pt")
    result = bnaudit("compare", f"{base}/ckpt_rank0.pt", f"{base}/ckpt_rank2.pt", "--format", "json")
    local = bnaudit("compare", str(run_folder / RANKS[0]), str(run_folder / RANKS[2]), "--format", "json")
    assert _normal(_report(result), base) == _normal(_report(local), run_folder)
    assert "ckpt_rank2.pt" not in served.reset_once


@pytest.fixture(scope="module")
def s3(run_folder: Path) -> Iterator[dict[str, str]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    paths = [str(run_folder / n) for n in (*RANKS, "big_rank0.pt", "big_rank1.pt")]
    with s3_run_bucket(paths) as env:
        yield env


def test_compare_over_s3_equals_local(run_folder, s3) -> None:
    local = _report(bnaudit("compare", *(str(run_folder / n) for n in RANKS), "--format", "json"))
    remote = _report(bnaudit("compare", "s3://bucket/run/ckpt_rank*.pt", "--format", "json", env=s3))
    assert _normal(remote, "s3://bucket/run") == _normal(local, run_folder)
    assert [i["path"] for i in remote["inputs"]] == [f"s3://bucket/run/{n}" for n in RANKS]
    big = _report(bnaudit("compare", "s3://bucket/run/big_rank*.pt", "--format", "json", env=s3))
    size = (run_folder / "big_rank0.pt").stat().st_size
    assert all(0 < i["transfer"]["bytes_read"] < size / 100 for i in big["inputs"])


def test_s3_faults_exit_2(s3) -> None:
    result = bnaudit("compare", "s3://bucket/run/ckpt_rank0.pt", "s3://bucket/run/nope_rank1.pt", env=s3)
    assert result.returncode == 2 and "s3://bucket/run/nope_rank1.pt" in result.stderr
    assert "no such object" in result.stderr
    result = bnaudit("compare", "s3://bucket/run/none_rank*.pt", env=s3)
    assert result.returncode == 2 and "matches no file" in result.stderr


def test_missing_fsspec_names_the_extra(run_folder, tmp_path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "fsspec.py").write_text("raise ImportError('blocked', name='fsspec')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [sys.executable, "-m", "bnaudit", "compare", "https://example.invalid/a_rank0.pt", "https://example.invalid/a_rank1.pt"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "pip install 'bnaudit[remote]'" in result.stderr, result.stderr


def test_average_from_s3_to_s3(run_folder, s3, tmp_path) -> None:
    local_out = tmp_path / "local.pt"
    assert bnaudit("average", *(str(run_folder / n) for n in RANKS), "-o", str(local_out)).returncode == 0
    args = ["average", "s3://bucket/run/ckpt_rank*.pt", "-o", "s3://bucket/out/fixed.pt"]
    result = bnaudit(*args, "--format", "json", env=s3)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["average"]["output"] == "s3://bucket/out/fixed.pt"
    fetch = (
        "import s3fs, sys; fs = s3fs.S3FileSystem()\n"
        "fs.get('bucket/out/fixed.pt', sys.argv[1]); fs.get('bucket/out/fixed.pt.bnaudit.json', sys.argv[2])\n"
    )
    got, side = tmp_path / "got.pt", tmp_path / "got.json"
    subprocess.run([sys.executable, "-c", fetch, str(got), str(side)], check=True, env=s3, timeout=120)
    assert got.read_bytes() == local_out.read_bytes()
    assert json.loads(side.read_text())["output"]["path"] == "s3://bucket/out/fixed.pt"
    again = bnaudit(*args, env=s3)
    assert (
        again.returncode == 2
        and "already exists" in again.stderr
        and "s3://bucket/out/fixed.pt" in again.stderr
    )
    assert bnaudit(*args, "--force", env=s3).returncode == 0


def test_inspect_a_url_as_a_local_file(run_folder, http) -> None:
    base, _ = http
    local = _report(bnaudit("inspect", str(run_folder / RANKS[0]), "--format", "json"))
    remote = _report(bnaudit("inspect", f"{base}/{RANKS[0]}", "--format", "json"))
    assert _normal(remote, base) == _normal(local, run_folder)
