"""Interrupts and concurrent writers lose nothing: real ``bnaudit average`` processes, real signals.

Each child runs the real command line with two pauses put into its write: after the output has been
written and verified under its temporary name (``mid-write``), or after the checkpoint has been renamed
into place but before its sidecar (``between-renames``). The test signals it there, or releases several
children at once to race for one output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, bn_state, save_ranks

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bnaudit import atomic_output
    from bnaudit.checkpoint import writer

    pause_at, barrier, hold, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

    def wait():
        print("writing", flush=True)
        deadline = time.monotonic() + 60
        while not barrier.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)

    verify_zip = writer._verify_zip

    def paused_verify(*args):
        verify_zip(*args)
        if pause_at == "mid-write":
            wait()

    place = atomic_output.AtomicOutput._place

    def slow_place(self, tmp, target):
        place(self, tmp, target)
        if target == self.target:
            if pause_at == "between-renames":
                wait()
            time.sleep(hold)

    writer._verify_zip = paused_verify
    atomic_output.AtomicOutput._place = slow_place
    from bnaudit.cli import main

    main(sys.argv[5:])
    """
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def ranks(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(3)
    return [p.name for p in save_ranks(tmp_path, [bn_state({"a": 8, "b": 16}, rng) for _ in range(2)])]


def _start(
    folder: Path, pause_at: str, argv: list[str], hold: float = 0.0, delay: float = 0.0
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", _CHILD, pause_at, "go", str(hold), str(delay), "--no-config", *argv]
    proc = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "writing", proc.communicate()[1]
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def _assert_complete(folder: Path) -> dict[str, object]:
    """out.pt and its sidecar are one write's: the sidecar's sha256 is out.pt's. Returns the sidecar."""
    sidecar = json.loads((folder / "out.pt.bnaudit.json").read_text())
    assert sidecar["output"]["sha256"] == _sha(folder / "out.pt")
    return dict(sidecar)


def _no_temp(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if "tmp" in p.name] == []


_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("signum", _SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "forced-over-old"])
def test_a_signal_mid_write_leaves_no_partial_file_and_no_temp(
    tmp_path: Path, ranks: list[str], signum: int, existing: bool
) -> None:
    if existing:
        (tmp_path / "out.pt").write_bytes(b"the previous output")
    before = _listing(tmp_path)
    proc = _start(tmp_path, "mid-write", ["average", *ranks, "-o", "out.pt", "--fail-on", "never", "--force"])
    assert any(p.name.endswith(".bnaudit-tmp") for p in tmp_path.iterdir())  # really mid-write
    proc.send_signal(signum)
    code, err = _finish(proc)
    if signum == signal.SIGINT:
        assert code == 130 and "interrupted; nothing was written" in err, err
    else:
        assert code == -signum, err
    assert _listing(tmp_path) == before  # no output, no sidecar, no temp; an old output untouched


@pytest.mark.parametrize("signum", _SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_between_the_renames_waits_for_the_sidecar(
    tmp_path: Path, ranks: list[str], signum: int
) -> None:
    proc = _start(tmp_path, "between-renames", ["average", *ranks, "-o", "out.pt", "--fail-on", "never"])
    assert (tmp_path / "out.pt").exists() and not (tmp_path / "out.pt.bnaudit.json").exists()
    proc.send_signal(signum)
    time.sleep(0.3)  # unheld, the signal would end the process now, with out.pt and no sidecar
    (tmp_path / "go").touch()
    code, err = _finish(proc)
    if signum == signal.SIGINT:
        assert code == 130, err
        assert "wrote out.pt, out.pt.bnaudit.json (complete) before the interrupt" in err, err
    else:
        assert code == -signum, err
    _assert_complete(tmp_path)
    _no_temp(tmp_path)


def test_two_processes_writing_one_new_output_give_one_file_and_one_error(
    tmp_path: Path, ranks: list[str]
) -> None:
    argv = ["average", *ranks, "-o", "out.pt", "--fail-on", "never"]
    procs = [_start(tmp_path, "mid-write", [*argv, "--method", m]) for m in ("pooled", "mean")]
    (tmp_path / "go").touch()
    results = [_finish(p) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "out.pt" in loser and "was created by another process" in loser, loser
    _assert_complete(tmp_path)
    _no_temp(tmp_path)


def test_two_processes_forcing_one_output_never_mix_checkpoint_and_sidecar(
    tmp_path: Path, ranks: list[str]
) -> None:
    argv = ["average", *ranks, "-o", "out.pt", "--fail-on", "never", "--force"]
    # The first renames its checkpoint, then takes a second before its sidecar; the second starts its
    # renames in that second. Unlocked, the end would be the second's checkpoint with the first's sidecar.
    first = _start(tmp_path, "mid-write", [*argv, "--method", "pooled"], hold=1.0)
    second = _start(tmp_path, "mid-write", [*argv, "--method", "mean"], delay=0.3)
    (tmp_path / "go").touch()
    results = [_finish(first), _finish(second)]
    assert [code for code, _ in results] == [0, 0], results
    sidecar = _assert_complete(tmp_path)
    assert sidecar["method"] == "mean"  # the later writer's whole output
    _no_temp(tmp_path)
