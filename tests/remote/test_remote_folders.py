"""Folder checkpoints behind a URL — Hugging Face sharded folders and torch.distributed.checkpoint folders —
over the counting HTTP range server and moto's S3 server on 127.0.0.1: inspect / compare equal the local
reports, average writes local (and S3) folders that the real loaders read back with exact statistics, faults
exit 2 naming the URL, and only a small part of a shard without statistics is read."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.checkpoint.test_dcp import save_dcp
from tests.conftest import REPO
from tests.remote.servers import Served, http_server, s3_run_bucket
from tests.remote.test_remote_inputs import _normal, _report, bnaudit
from tests.repair.test_average import rank_states
from tests.repair.test_folder_repairs import (
    INDEX,
    PLAIN_SHARD,
    STATS_SHARD,
    _dcp_load,
    digests,
    expected_stats,
    save_sharded,
)

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
RANKS = 3
BIG = 5_000_000  # float32 elements of the tensor beside BatchNorm: 20 MB, in the shard without statistics


def _states() -> list[dict[str, torch.Tensor]]:
    states = rank_states(np.random.default_rng(17), RANKS)
    for state in states:
        state["fc.weight"] = torch.zeros(BIG)
    return states


@pytest.fixture(scope="module")
def served_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hf_rank{r}/ (save_pretrained's layout, written by safetensors) and dcp_rank{r}/ (dcp.save)."""
    root = tmp_path_factory.mktemp("folders")
    for r, state in enumerate(_states()):
        save_sharded(root / f"hf_rank{r}", state)
        save_dcp(root / f"dcp_rank{r}", {"model": state, "step": 5})
    broken = root / "hf_broken"  # its index names a shard that is not there
    shutil.copytree(root / "hf_rank0", broken)
    (broken / STATS_SHARD).unlink()
    shutil.copytree(root / "dcp_rank0", root / "dcp_nometa")
    (root / "dcp_nometa" / ".metadata").unlink()
    return root


@pytest.fixture(scope="module")
def http(served_root: Path) -> Iterator[tuple[str, Served]]:
    with http_server(served_root) as served:
        yield served


@pytest.fixture(scope="module")
def s3(served_root: Path) -> Iterator[dict[str, str]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    folders = [str(served_root / f"{kind}_rank{r}") for kind in ("hf", "dcp") for r in range(RANKS)]
    with s3_run_bucket(folders) as env:
        yield env


def _same_report(args: list[str], local: list[Path], remote: list[str], base: str, root: Path, env=None):
    want = _report(bnaudit(*args[:1], *map(str, local), *args[1:], "--format", "json"))
    got = _report(bnaudit(*args[:1], *remote, *args[1:], "--format", "json", env=env))
    assert _normal(got, base) == _normal(want, root)
    assert [i["path"] for i in got["inputs"]] == remote
    return got


@pytest.mark.parametrize("kind", ["folder", "index"])
def test_sharded_folder_over_http_reads_as_the_local_one(served_root, http, kind) -> None:
    base, served = http
    names = [f"hf_rank{r}" + ("" if kind == "folder" else f"/{INDEX}") for r in range(RANKS)]
    before = dict(served.bytes)
    local, remote = [served_root / n for n in names], [f"{base}/{n}" for n in names]
    report = _same_report(["compare"], local, remote, base, served_root)
    for r, entry in enumerate(report["inputs"]):
        members = [f"hf_rank{r}/{n}" for n in (INDEX, PLAIN_SHARD, STATS_SHARD)]
        counted = sum(served.bytes.get(m, 0) - before.get(m, 0) for m in members)
        assert entry["transfer"]["bytes_read"] == counted > 0
        big = f"hf_rank{r}/{PLAIN_SHARD}"
        size = (served_root / big).stat().st_size
        assert size > 4 * BIG and 0 < served.bytes[big] - before.get(big, 0) < size / 100, (big, size)
    _same_report(["inspect"], local[:1], remote[:1], base, served_root)


@pytest.mark.parametrize("kind", ["folder", "metadata"])
def test_dcp_folder_over_http_reads_as_the_local_one(served_root, http, kind) -> None:
    base, served = http
    names = [f"dcp_rank{r}" for r in range(RANKS)]
    local = [served_root / n for n in names]
    remote = [f"{base}/{n}" + ("" if kind == "folder" else "/.metadata") for n in names]
    before = dict(served.bytes)
    report = _same_report(["compare"], local, [*remote], base, served_root) if kind == "folder" else None
    if report is None:  # the report names the input as given: the .metadata URL, the local folder
        got = _report(bnaudit("compare", *remote, "--format", "json"))
        want = _report(bnaudit("compare", *map(str, local), "--format", "json"))
        text = json.dumps(got)
        for name in names:
            text = text.replace(f"{base}/{name}/.metadata", f"{base}/{name}")
        text = text.replace("dcp_rank*/.metadata", "dcp_rank*")  # the next step's pattern, as given
        assert _normal(json.loads(text), base) == _normal(want, served_root)
        report = got
    for r, entry in enumerate(report["inputs"]):
        members = [m for m in served.bytes if m.startswith(f"dcp_rank{r}/")]
        counted = sum(served.bytes[m] - before.get(m, 0) for m in members)
        assert entry["transfer"]["bytes_read"] == counted > 0
        data = next((served_root / f"dcp_rank{r}").glob("*.distcp"))
        read = served.bytes[f"dcp_rank{r}/{data.name}"] - before.get(f"dcp_rank{r}/{data.name}", 0)
        assert data.stat().st_size > 4 * BIG and 0 < read < data.stat().st_size / 100
    _same_report(["inspect"], local[:1], [f"{base}/dcp_rank0"], base, served_root)


def test_average_of_http_sharded_folders_into_a_local_folder(served_root, http, tmp_path) -> None:
    """A plain HTTP server (no folder listing): the index URL names the shards; only they are copied."""
    states = _states()
    base, served = http
    out = tmp_path / "fixed"
    served.deny.update(f"hf_rank{r}{end}" for r in range(RANKS) for end in ("", "/"))  # no listing
    before = dict(served.bytes)
    try:
        result = bnaudit("average", *(f"{base}/hf_rank{r}/{INDEX}" for r in range(RANKS)), "-o", str(out))
    finally:
        served.deny.clear()
    assert result.returncode == 0, result.stderr
    for r in range(RANKS):  # the reference's shards downloaded once each; the others' barely read
        name = f"hf_rank{r}/{PLAIN_SHARD}"
        size, read = (served_root / name).stat().st_size, served.bytes[name] - before.get(name, 0)
        assert size <= read < 1.01 * size if r == 0 else 0 < read < size / 100, (name, read, size)
    source = digests(served_root / "hf_rank0")
    written = digests(out)
    assert sorted(written) == sorted([INDEX, PLAIN_SHARD, STATS_SHARD])  # the index names no config.json
    assert written[INDEX] == source[INDEX] and written[PLAIN_SHARD] == source[PLAIN_SHARD]
    with safe_open(out / STATS_SHARD, "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    for key, value in expected_stats(states).items():
        np.testing.assert_array_equal(got[key].numpy(), value.astype(np.float32))
    assert not [p for p in tmp_path.iterdir() if "bnaudit-tmp" in p.name]
    sidecar = json.loads((tmp_path / "fixed.bnaudit.json").read_text())
    assert sidecar["output"]["path"] == str(out)


def _average_locally(root: Path, out: Path) -> None:
    """The local ``average`` of the sharded rank folders: what a remote run must equal byte for byte."""
    result = bnaudit("average", *(str(root / f"hf_rank{r}") for r in range(RANKS)), "-o", str(out))
    assert result.returncode == 0, result.stderr


def test_average_of_s3_folders_into_local_folders(served_root, s3, tmp_path) -> None:
    states = _states()
    hf_out, dcp_out = tmp_path / "fixed_hf", tmp_path / "fixed_dcp"
    args = [f"s3://bucket/run/hf_rank{r}" for r in range(RANKS)]
    assert bnaudit("average", *args, "-o", str(hf_out), env=s3).returncode == 0
    local = tmp_path / "local_hf"
    _average_locally(served_root, local)
    assert digests(hf_out) == digests(local) and "config.json" in digests(hf_out)
    with safe_open(hf_out / STATS_SHARD, "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    result = bnaudit(
        "average", *(f"s3://bucket/run/dcp_rank{r}" for r in range(RANKS)), "-o", str(dcp_out), env=s3
    )
    assert result.returncode == 0, result.stderr
    loaded = _dcp_load(dcp_out, {"model": states[0], "step": 5})
    for key, value in expected_stats(states).items():
        np.testing.assert_array_equal(got[key].numpy(), value.astype(np.float32))
        np.testing.assert_array_equal(loaded["model"][key].numpy(), value.astype(np.float32))
    assert torch.equal(loaded["model"]["fc.weight"], states[0]["fc.weight"]) and loaded["step"] == 5
    assert digests(dcp_out)[".metadata"] == digests(served_root / "dcp_rank0")[".metadata"]


def test_diff_and_inspect_of_s3_folders_equal_local(served_root, s3) -> None:
    for kind in ("hf", "dcp"):
        local = [served_root / f"{kind}_rank{r}" for r in range(2)]
        remote = [f"s3://bucket/run/{kind}_rank{r}" for r in range(2)]
        _same_report(["diff"], local, remote, "s3://bucket/run", served_root, env=s3)
        _same_report(["inspect"], local[:1], remote[:1], "s3://bucket/run", served_root, env=s3)


def test_compare_of_s3_folders_equals_local(served_root, s3) -> None:
    for kind in ("hf", "dcp"):
        local = [served_root / f"{kind}_rank{r}" for r in range(RANKS)]
        remote = [f"s3://bucket/run/{kind}_rank{r}" for r in range(RANKS)]
        report = _same_report(["compare"], local, remote, "s3://bucket/run", served_root, env=s3)
        assert all(0 < i["transfer"]["bytes_read"] < 4 * BIG / 50 for i in report["inputs"])
        globbed = _report(bnaudit("compare", f"s3://bucket/run/{kind}_rank*", "--format", "json", env=s3))
        assert [i["path"] for i in globbed["inputs"]] == remote


def test_average_from_s3_folders_to_an_s3_folder(served_root, s3, tmp_path) -> None:
    local_out = tmp_path / "local_hf"
    _average_locally(served_root, local_out)
    args = ["average", *(f"s3://bucket/run/hf_rank{r}" for r in range(RANKS)), "-o", "s3://bucket/fixed/hf"]
    result = bnaudit(*args, "--format", "json", env=s3)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["average"]["output"] == "s3://bucket/fixed/hf"
    fetch = "import s3fs, sys; s3fs.S3FileSystem().get('bucket/fixed/', sys.argv[1], recursive=True)\n"
    got = tmp_path / "got"
    subprocess.run([sys.executable, "-c", fetch, str(got)], check=True, env=s3, timeout=120)
    assert digests(got / "hf") == digests(local_out)
    side = json.loads((got / "hf.bnaudit.json").read_text())
    assert side["output"]["path"] == "s3://bucket/fixed/hf"
    again = bnaudit(*args, env=s3)
    assert (
        again.returncode == 2 and "already exists" in again.stderr and "s3://bucket/fixed/hf" in again.stderr
    )
    assert bnaudit(*args, "--force", env=s3).returncode == 0
    from_local = [
        "average",
        *(str(served_root / f"hf_rank{r}") for r in range(RANKS)),
        "-o",
        "s3://bucket/fixed/l",
    ]
    assert bnaudit(*from_local, env=s3).returncode == 0
    subprocess.run([sys.executable, "-c", fetch, str(tmp_path / "again")], check=True, env=s3, timeout=120)
    assert digests(tmp_path / "again" / "l") == digests(local_out)
    into_input = bnaudit(*args[:-1], "s3://bucket/run/hf_rank0", "--force", env=s3)
    assert into_input.returncode == 2 and "is the input folder" in into_input.stderr


@pytest.mark.parametrize(
    ("target", "fault", "message"),
    [
        ("hf_broken", None, f"shard '{STATS_SHARD}' named in weight_map is missing"),
        (f"hf_nothing/{INDEX}", None, "no such object"),
        ("dcp_nometa/.metadata", None, "no such object"),
        ("hf_rank1", "deny", "access denied"),
        ("dcp_rank1", "deny", "access denied"),
    ],
)
def test_folder_faults_exit_2_naming_the_url(served_root, http, target, fault, message) -> None:
    base, served = http
    denied = ""
    if fault == "deny":
        folder = served_root / target
        denied = STATS_SHARD if target.startswith("hf") else next(folder.glob("*.distcp")).name
        served.deny.add(f"{target}/{denied}")
    try:
        result = bnaudit(
            "compare",
            f"{base}/hf_rank0" if target.startswith("hf") else f"{base}/dcp_rank0",
            f"{base}/{target}",
        )
    finally:
        served.deny.clear()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    named = f"{base}/{target}/{denied}" if denied else f"{base}/{target}"
    assert len(lines) == 1 and named in lines[0] and message in lines[0], result.stderr


def test_a_remote_folder_without_metadata_or_index_exits_2(s3) -> None:
    code = "import s3fs; s3fs.S3FileSystem().pipe('bucket/empty/readme.txt', b'no checkpoint')\n"
    subprocess.run([sys.executable, "-c", code], check=True, env=s3, timeout=120)
    result = bnaudit("inspect", "s3://bucket/empty", env=s3)
    assert result.returncode == 2 and "s3://bucket/empty" in result.stderr
    assert "without a .metadata file or a single *.index.json" in result.stderr


def _readme_folder_commands() -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("#### Folder checkpoints behind URLs", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("bnaudit ")]


def test_the_readme_folder_commands_run(http, s3, tmp_path) -> None:
    """Each command of the README's remote folder block, its example.com host served by the HTTP server."""
    base, _ = http
    commands = _readme_folder_commands()
    assert len(commands) == 5
    for words in commands:
        args = [w.replace("https://example.com/run", base) for w in words[1:]]
        result = subprocess.run(
            [sys.executable, "-m", "bnaudit", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**s3, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode in (0, 1), (words, result.stderr)
    assert (tmp_path / "fixed_dcp" / ".metadata").is_file()
    listed = "import s3fs; print(sorted(p.rsplit('/', 1)[1] for p in s3fs.S3FileSystem().ls('bucket/run_fixed/hf')))"
    out = subprocess.run([sys.executable, "-c", listed], capture_output=True, text=True, env=s3, timeout=120)
    assert INDEX in out.stdout and STATS_SHARD in out.stdout, out.stderr
