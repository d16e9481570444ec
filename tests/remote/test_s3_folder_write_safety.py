"""A folder output to S3 (sharded Hugging Face) that fails, is interrupted or meets another writer before
its index is up leaves nothing of the run: the files uploaded so far are deleted, another writer's kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.remote.test_remote_folders import INDEX, RANKS, s3, served_root  # noqa: F401 (fixtures)
from tests.remote.test_s3_range_copy import _left_behind

pytest.importorskip("s3fs")
pytest.importorskip("moto")

# bnaudit's CLI in a child whose uploads into the target folder are counted; the second one (a data file:
# the index goes last) misbehaves as argv[1] says: "deny" (AccessDenied), "slow" (announce, then wait: the
# moment for SIGTERM), "race" (another writer puts the index first, then the upload goes on).
_CHILD = """
import asyncio, sys
import s3fs
from bnaudit.cli import main

how, target, seen, real = sys.argv[1], sys.argv[2], [], s3fs.S3FileSystem._put_file

async def put_file(self, lpath, rpath, *args, **kwargs):
    if target in str(rpath):
        seen.append(rpath)
        if len(seen) == 2 and how == "deny":
            raise PermissionError("AccessDenied")
        if len(seen) == 2 and how == "slow":
            print("now", flush=True)
            await asyncio.sleep(1.0)
        if len(seen) == 2 and how == "race":
            await self._pipe_file(target + "/INDEX", b"another writer's index")
    return await real(self, lpath, rpath, *args, **kwargs)

s3fs.S3FileSystem._put_file = put_file
main(sys.argv[3:])
"""


@pytest.fixture
def store(request: pytest.FixtureRequest) -> tuple[Path, dict[str, str], Any]:
    """The local rank folders, the environment reaching the moto server, and an s3fs filesystem on it."""
    return tuple(request.getfixturevalue(name) for name in ("served_root", "s3", "fs"))  # type: ignore[return-value]


def _child(how: str, folder: str, root: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    code = _CHILD.replace("INDEX", INDEX)
    args = ["average", *(str(root / f"hf_rank{r}") for r in range(RANKS)), "-o", f"s3://bucket/{folder}/hf"]
    return subprocess.Popen(
        [sys.executable, "-c", code, how, f"bucket/{folder}/hf", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


def test_a_failed_upload_deletes_the_files_uploaded_so_far(store: tuple[Path, dict[str, str], Any]) -> None:
    root, env, fs = store
    _, stderr = _child("deny", "denied", root, env).communicate(timeout=120)
    assert "access denied" in stderr and "s3://bucket/denied/hf" in stderr, stderr
    assert _left_behind(fs, "denied") == ([], [])


def test_sigterm_mid_upload_deletes_the_files_uploaded_so_far(
    store: tuple[Path, dict[str, str], Any],
) -> None:
    root, env, fs = store
    child = _child("slow", "term", root, env)
    try:
        assert child.stdout is not None and child.stdout.readline() == "now\n"
        os.kill(child.pid, signal.SIGTERM)  # one data file up, the second on its way
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert _left_behind(fs, "term") == ([], [])
    assert child.returncode == -signal.SIGTERM and "bnaudit: terminated" in stderr, stderr


def test_another_writers_index_is_kept_and_the_run_leaves_nothing(
    store: tuple[Path, dict[str, str], Any],
) -> None:
    root, env, fs = store
    child = _child("race", "race", root, env)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 2 and "already exists" in stderr, stderr
    assert f"s3://bucket/race/hf/{INDEX}" in stderr, stderr
    assert _left_behind(fs, "race") == ([INDEX], [])
    assert fs.cat_file(f"bucket/race/hf/{INDEX}") == b"another writer's index"
