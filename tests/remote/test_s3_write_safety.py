"""S3 outputs that are never partial nor clobbered, whatever else happens: a reference on another store (the
upload path), recalibrate by server-side copy, a final copy over S3's part size limit, an object another
writer put at the target after the check (conditional writes), SIGTERM in the middle of a write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.recal_helpers.models import make_convnet
from tests.remote.servers import http_server, s3_run_bucket
from tests.remote.test_remote_inputs import bnaudit
from tests.remote.test_s3_range_copy import RANKS, _big_rank, _left_behind, _patched
from tests.repair.test_recalibrate import SPEC, _assert_exact

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    for r, name in enumerate(RANKS):
        _big_rank(folder / name, r)
    # a recalibratable model with 12 MB of optimizer-like state: big enough for the server-side path
    big = {"model": make_convnet().state_dict(), "optimizer": {"exp_avg": torch.arange(3_000_000.0)}}
    torch.save(big, folder / "convnet_big.pt")
    return folder


@pytest.fixture(scope="module")
def s3(ranks: Path) -> Iterator[dict[str, str]]:
    with s3_run_bucket([*(ranks / n for n in RANKS), ranks / "convnet_big.pt"]) as env:
        yield env


def test_a_reference_on_another_store_is_downloaded_patched_and_uploaded(
    ranks: Path, s3: dict[str, str], fs: Any, tmp_path: Path
) -> None:
    local = tmp_path / "local.pt"
    assert bnaudit("average", *(str(ranks / n) for n in RANKS), "-o", str(local)).returncode == 0
    with http_server(ranks) as (base, served):
        args = ["average", *(f"{base}/{n}" for n in RANKS), "-o", "s3://bucket/other/fixed.pt"]
        result = bnaudit(*args, "--format", "json", env=s3)
        assert result.returncode == 0, result.stderr
        upload = json.loads(result.stdout)["average"]["upload"]
        assert upload == "multipart upload, completed after every part", upload  # no server-side copy
        assert served.bytes[RANKS[0]] >= local.stat().st_size  # the reference was downloaded whole
        assert fs.cat_file("bucket/other/fixed.pt") == local.read_bytes()
        assert _left_behind(fs, "other") == (["fixed.pt", "fixed.pt.bnaudit.json"], [])
        again = bnaudit(*args, env=s3)
        assert again.returncode == 2 and "already exists" in again.stderr, again.stderr


def test_recalibrate_s3_to_s3_by_server_side_copy(
    ranks: Path, s3: dict[str, str], fs: Any, tmp_path: Path
) -> None:
    calibration = ("--model", SPEC.model, "--data", SPEC.data, "--format", "json")
    local = tmp_path / "local.pt"
    assert (
        bnaudit("recalibrate", str(ranks / "convnet_big.pt"), *calibration, "-o", str(local)).returncode == 0
    )
    url = "s3://bucket/recal/fixed.pt"
    result = bnaudit("recalibrate", "s3://bucket/run/convnet_big.pt", *calibration, "-o", url, env=s3)
    assert result.returncode == 0, result.stderr
    upload = json.loads(result.stdout)["upload"]
    assert upload.startswith("server-side copy: ") and "bytes copied in" in upload, upload
    assert fs.cat_file("bucket/recal/fixed.pt") == local.read_bytes()
    _assert_exact(torch.load(local, weights_only=True)["model"])
    side = json.loads(fs.cat_file("bucket/recal/fixed.pt.bnaudit.json"))
    assert side["output"]["path"] == url and side["output"]["upload"] == upload
    assert _left_behind(fs, "recal") == (["fixed.pt", "fixed.pt.bnaudit.json"], [])


def _calls_recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import s3fs

    real, calls = s3fs.S3FileSystem.call_s3, []

    def record(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", record)
    return calls


def test_a_final_copy_over_the_part_size_limit_goes_in_several_parts(
    fs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnaudit.checkpoint import s3_multipart
    from bnaudit.checkpoint.remote_write import write_repaired

    monkeypatch.setattr(s3_multipart, "MAX_PART", 16 << 20)  # S3's 5 GiB part limit, scaled down
    calls = _calls_recorded(monkeypatch)
    ckpt, patches = _patched("s3://bucket/run/big_rank0.pt")
    expected = fs.cat_file("bucket/run/big_rank0.pt")
    write_repaired(ckpt, patches, "s3://bucket/limit/fixed.pt")
    final = calls[calls.index("complete_multipart_upload") + 1 :]  # after the temporary object's upload
    assert final.count("upload_part_copy") == 3 and final.count("complete_multipart_upload") == 1, final
    got = fs.cat_file("bucket/limit/fixed.pt")
    assert len(got) == len(expected) > 2 * (16 << 20)
    differs = [i for i in range(0, len(got), 4096) if got[i : i + 4096] != expected[i : i + 4096]]
    assert differs and len(differs) <= 3  # the patched tensor and the CRC-32s of its entry only
    assert _left_behind(fs, "limit") == (["fixed.pt"], [])


@pytest.mark.parametrize("limit", [None, 16 << 20], ids=["one-part", "three-parts"])
def test_an_object_put_after_the_check_is_kept_by_the_server_side_path(
    fs: Any, monkeypatch: pytest.MonkeyPatch, limit: int | None
) -> None:
    from bnaudit.checkpoint import s3_multipart, s3_range_copy
    from bnaudit.checkpoint.remote_write import write_repaired
    from bnaudit.errors import OutputError

    if limit is not None:
        monkeypatch.setattr(s3_multipart, "MAX_PART", limit)
    real = s3_range_copy.copy_whole
    folder = f"race-{limit}"

    def other_writer_first(*args: Any, **kwargs: Any) -> None:
        fs.pipe_file(f"bucket/{folder}/fixed.pt", b"another writer's object")  # after bnaudit's check
        real(*args, **kwargs)

    monkeypatch.setattr(s3_range_copy, "copy_whole", other_writer_first)
    ckpt, patches = _patched("s3://bucket/run/big_rank1.pt")
    with pytest.raises(OutputError, match="already exists"):
        write_repaired(ckpt, patches, f"s3://bucket/{folder}/fixed.pt")
    assert fs.cat_file(f"bucket/{folder}/fixed.pt") == b"another writer's object"
    assert _left_behind(fs, folder) == (["fixed.pt"], [])


def test_an_object_put_after_the_check_is_kept_by_the_upload_path(
    ranks: Path, fs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnaudit.checkpoint import remote_write
    from bnaudit.checkpoint.load import load_checkpoint
    from bnaudit.checkpoint.patch_plan import TensorPatch
    from bnaudit.errors import OutputError

    real = remote_write.write_checkpoint

    def then_another_writer(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        fs.pipe_file("bucket/uprace/fixed.pt", b"another writer's object")  # while bnaudit verified locally
        return result

    monkeypatch.setattr(remote_write, "write_checkpoint", then_another_writer)
    ckpt = load_checkpoint(ranks / RANKS[0])  # a local reference: written locally, then uploaded
    ref = ckpt.state_dict("model").tensors["b0.bn.running_mean"]
    patches = [TensorPatch("model", "b0.bn.running_mean", ref, np.zeros(16))]
    with pytest.raises(OutputError, match="already exists"):
        remote_write.write_repaired(ckpt, patches, "s3://bucket/uprace/fixed.pt")
    assert fs.cat_file("bucket/uprace/fixed.pt") == b"another writer's object"
    assert _left_behind(fs, "uprace") == (["fixed.pt"], [])


# bnaudit's CLI in a child whose S3 calls of one kind announce themselves and take a second: the moment to
# send SIGTERM (argv: the call to slow down, then bnaudit's arguments).
_SLOWED = """
import sys, time
import s3fs
from bnaudit.cli import main

slowed, real = sys.argv[1], s3fs.S3FileSystem.call_s3

def call_s3(self, method, *args, **kwargs):
    if method == slowed and ".bnaudit-tmp" in str(kwargs.get("Key", "")):
        print("now", flush=True)
        time.sleep(1.0)
    return real(self, method, *args, **kwargs)

s3fs.S3FileSystem.call_s3 = call_s3
main(sys.argv[2:])
"""


@pytest.mark.parametrize("phase", ["upload_part_copy", "head_object"], ids=["parts", "verification"])
def test_sigterm_during_a_server_side_write_leaves_nothing(s3: dict[str, str], fs: Any, phase: str) -> None:
    folder = f"term-{phase}"
    args = ["average", "s3://bucket/run/big_rank*.pt", "-o", f"s3://bucket/{folder}/fixed.pt"]
    env = {**s3, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOWED, phase, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().startswith(
            "now"
        )  # threads may share a line
        os.kill(child.pid, signal.SIGTERM)  # parts in flight, or the temporary object being read back
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert _left_behind(fs, folder) == ([], [])  # no temporary object, no unfinished upload, no target
    assert child.returncode == -signal.SIGTERM, stderr
    assert "bnaudit: terminated; nothing was written" in stderr, stderr
    assert "Traceback" not in stderr, stderr
