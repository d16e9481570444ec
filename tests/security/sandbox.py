"""Proof that a case executes: load it the way a victim would, in a sandboxed child, and look for the marker.

One interpreter imports torch once and forks a child per case; each child gets a fresh temp folder as its
cwd and HOME, an alarm, and loads the file with ``torch.load(path, weights_only=False)`` (or
``torch.distributed.checkpoint.load`` for a folder). The payloads only create their marker; the child then
waits briefly for spawned processes (``posix_spawn``, ``Popen``) before reporting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_CHILD = r"""
import json, os, signal, sys, tempfile, time, warnings
warnings.simplefilter("ignore")
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

def load(path, how):
    if how == "dcp":
        metadata = dcp.FileSystemReader(path).read_metadata()
        sd = {}
        for key, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
            else:
                sd[key] = None
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    else:
        torch.load(path, weights_only=False)

def run_one(path, how, marker, timeout):
    pid = os.fork()
    if pid == 0:
        home = tempfile.mkdtemp(prefix="victim-")
        os.chdir(home)
        os.environ["HOME"] = os.environ["TMPDIR"] = tempfile.tempdir = home
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1); os.dup2(devnull, 2)
        signal.alarm(timeout)
        error = 0
        try:
            load(path, how)
        except BaseException:
            error = 2
        for _ in range(12):
            if os.path.exists(marker):
                break
            time.sleep(0.025)
        os._exit(error + (1 if os.path.exists(marker) else 0))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"executed": code in (1, 3), "load_error": code in (2, 3) or code < 0, "code": code}

jobs = json.load(sys.stdin)
print(json.dumps({j["name"]: run_one(j["path"], j["load"], j["marker"], j["timeout"]) for j in jobs}))
"""


@dataclass(frozen=True)
class Verdict:
    executed: bool
    load_error: bool


def victim_loads(jobs: list[dict[str, str]], timeout: int = 30) -> dict[str, Verdict]:
    """Load each job (name, path, load, marker) as a victim would; which created their marker."""
    for job in jobs:
        Path(job["marker"]).unlink(missing_ok=True)
    payload = json.dumps([{**job, "timeout": timeout} for job in jobs])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BNAUDIT"))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout * (len(jobs) + 1),
        check=True,
    )
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: Verdict(v["executed"], v["load_error"]) for name, v in raw.items()}
