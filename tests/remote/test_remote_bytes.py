"""What a remote rank costs, as the servers count it: bounded by the bytes the audit needs, computed here
from the file's own layout with Python's zipfile (the directory and end records, the pickle, the BatchNorm
entries, every other entry's fixed local header), plus a small allowance per request."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.remote.servers import Served, counting_s3_server, http_server, s3_env

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
LAYERS, CHANNELS = 12, 64
PER_REQUEST = 1024  # bytes a request may take beyond the ones the audit needs
FIXED_LOCAL_HEADER = 30


def _rank(path: Path, rank: int) -> list[str]:
    """A multi-layer rank (conv weights between the BatchNorm layers, as a model's state dict lays them
    out); the tensor names in the order torch.save numbers their storages."""
    gen = torch.Generator().manual_seed(rank)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(LAYERS):
        sd[f"layer{i}.conv.weight"] = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=gen)
        sd[f"layer{i}.bn.weight"] = torch.ones(CHANNELS)
        sd[f"layer{i}.bn.bias"] = torch.zeros(CHANNELS)
        sd[f"layer{i}.bn.running_mean"] = torch.randn(CHANNELS, generator=gen) * 0.1
        sd[f"layer{i}.bn.running_var"] = 1 + torch.rand(CHANNELS, generator=gen)
        sd[f"layer{i}.bn.num_batches_tracked"] = torch.tensor(100 + rank)
    torch.save({"model": sd}, path)
    return list(sd)


def needed_bytes(path: Path, names: list[str]) -> int:
    """The bytes an audit of ``path`` must read, from its layout: the central directory and end records,
    the pickle's and every BatchNorm storage's local header and data, and the fixed part of every other
    local header (read to locate and check the entries)."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        infos = zf.infolist()
        directory = path.stat().st_size - zf.start_dir
        total = directory
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            header = FIXED_LOCAL_HEADER + name_len + extra_len
            key = info.filename.rsplit("/", 1)[-1]
            if info.filename.endswith("/data.pkl"):
                total += header + info.compress_size
            elif "/data/" in info.filename:
                tensor = names[int(key)]
                size = 8 if tensor.endswith("num_batches_tracked") else 4 * CHANNELS
                if ".bn." in tensor:
                    assert info.compress_size == size, (tensor, info.compress_size)  # keys follow the dict
                    total += header + size
                else:
                    total += FIXED_LOCAL_HEADER
            else:
                total += FIXED_LOCAL_HEADER
    return total


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("layered")
    names = [_rank(folder / f"ckpt_rank{r}.pt", r) for r in range(2)]
    return folder, names[0]


def _compare(env: dict[str, str], *urls: str) -> dict:
    env = {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bnaudit", "compare", *urls, "--format", "json", "--fail-on", "never"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _check(served: Served, report: dict, folder: Path, names: list[str], key_of: dict[str, str]) -> None:
    for entry in report["inputs"]:
        name = entry["path"].rsplit("/", 1)[1]
        path, key = folder / name, key_of[name]
        sent, requests = served.bytes[key], served.requests[key]
        bound = needed_bytes(path, names) + PER_REQUEST * requests
        assert entry["transfer"] == {"bytes_read": sent, "requests": requests}
        assert 0 < sent <= bound < path.stat().st_size / 10, (name, sent, bound)
        assert requests <= LAYERS + 8, (name, requests)  # a request per layer and a few for the rest


def test_http_bytes_per_rank_stay_within_the_layout_bound(ranks) -> None:
    folder, names = ranks
    with http_server(folder) as (base, served):
        report = _compare(dict(os.environ), f"{base}/ckpt_rank*.pt")
    _check(served, report, folder, names, {n: n for n in ("ckpt_rank0.pt", "ckpt_rank1.pt")})


@pytest.fixture
def counted_s3(ranks) -> Iterator[tuple[dict[str, str], Served]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    folder, _ = ranks
    with counting_s3_server() as (endpoint, served):
        env = s3_env(endpoint)
        upload = (
            "import s3fs, sys; fs = s3fs.S3FileSystem(); fs.mkdir('bucket')\n"
            "for p in sys.argv[1:]: fs.put(p, 'bucket/run/' + p.rsplit('/', 1)[1])\n"
        )
        files = [str(folder / f"ckpt_rank{r}.pt") for r in range(2)]
        subprocess.run([sys.executable, "-c", upload, *files], check=True, env=env, timeout=120)
        served.bytes.clear()
        served.requests.clear()
        yield env, served


def test_s3_bytes_per_rank_counted_by_the_server_stay_within_the_layout_bound(ranks, counted_s3) -> None:
    folder, names = ranks
    env, served = counted_s3
    report = _compare(env, "s3://bucket/run/ckpt_rank*.pt")
    keys = {f"ckpt_rank{r}.pt": f"bucket/run/ckpt_rank{r}.pt" for r in range(2)}
    _check(served, report, folder, names, keys)
