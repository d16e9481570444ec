"""bnaudit.atomic_output: every file bnaudit writes (reports, checkpoints, sidecars) gets one behaviour."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bnaudit import temp_registry
from bnaudit.atomic_output import AtomicOutput, write_text_atomically
from bnaudit.checkpoint import load_checkpoint, read_tensor
from bnaudit.checkpoint.writer import TensorPatch, write_patched
from bnaudit.cli import options
from bnaudit.errors import OutputError
from tests.conftest import REPO


def _checkpoint(folder: Path) -> Path:
    path = folder / "ref.pt"
    torch.save({"model": torch.nn.BatchNorm1d(3).state_dict()}, path)
    return path


def _patch(path: Path) -> tuple[object, list[TensorPatch]]:
    ckpt = load_checkpoint(path)
    sd = ckpt.state_dicts[0]
    ref = sd.tensors["running_mean"]
    return ckpt, [TensorPatch(sd.name, "running_mean", ref, read_tensor(ref) + 1.0)]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask():  # type: ignore[no-untyped-def]
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_report_and_checkpoint_honour_the_umask(tmp_path: Path, umask, mask: int) -> None:  # type: ignore[no-untyped-def]
    src = _checkpoint(tmp_path)
    umask(mask)
    report = tmp_path / "report.json"
    options.write_text_atomically(report, "{}\n")
    ckpt, patches = _patch(src)
    out, sidecar = tmp_path / "out.pt", tmp_path / "out.pt.bnaudit.json"
    write_patched(ckpt, patches, out, companions=lambda result: [(sidecar, "{}\n")])  # type: ignore[arg-type]
    for path in (report, out, sidecar):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert _leftovers(tmp_path) == []


def test_files_and_their_folder_are_fsynced(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    synced: list[str] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    write_text_atomically(tmp_path / "report.txt", "ok\n")
    assert synced == ["file", "folder"]
    synced.clear()
    with AtomicOutput(tmp_path / "main.bin") as staged:
        staged.write(b"main")
        staged.add_companion(tmp_path / "main.bin.json", "{}")
        staged.commit()
    assert synced == ["file", "file", "folder"]
    assert (tmp_path / "main.bin").read_bytes() == b"main" and (
        tmp_path / "main.bin.json"
    ).read_text() == "{}"


def test_an_exception_mid_write_leaves_the_old_target_and_no_temp(tmp_path: Path) -> None:
    target, companion = tmp_path / "out.bin", tmp_path / "out.bin.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), AtomicOutput(target) as staged:
        staged.write(b"new content")
        staged.add_companion(companion, "{}")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and not companion.exists()
    assert _leftovers(tmp_path) == []
    assert not temp_registry.LIVE_TEMPS


def test_a_failing_checkpoint_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    src = _checkpoint(tmp_path)
    ckpt, patches = _patch(src)
    (tmp_path / "out.pt").write_bytes(b"old")

    def failing(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("bnaudit.checkpoint.writer._apply", failing)
    with pytest.raises(KeyboardInterrupt):
        write_patched(ckpt, patches, tmp_path / "out.pt")  # type: ignore[arg-type]
    assert (tmp_path / "out.pt").read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bnaudit.atomic_output import AtomicOutput

    target = Path(sys.argv[1])
    with AtomicOutput(target) as staged:
        staged.write(b"partial " * 1000)
        staged.add_companion(target.with_name(target.name + ".json"), "{}")
        print("writing", flush=True)
        time.sleep(60)  # blocked mid-write: the parent sends SIGTERM now
        staged.commit()
    """
)

_CHILD_CHECKPOINT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bnaudit.checkpoint import load_checkpoint, read_tensor
    from bnaudit.checkpoint import writer
    from bnaudit.checkpoint.writer import TensorPatch, write_patched

    def blocked(fd, ranges, shift):
        print("writing", flush=True)
        time.sleep(60)

    writer._apply = blocked
    ckpt = load_checkpoint(sys.argv[2])
    sd = ckpt.state_dicts[0]
    ref = sd.tensors["running_mean"]
    write_patched(ckpt, [TensorPatch(sd.name, "running_mean", ref, read_tensor(ref) + 1)], Path(sys.argv[1]))
    """
)


@pytest.mark.parametrize("old", [None, b"old"], ids=["new-target", "existing-target"])
@pytest.mark.parametrize("child", [_CHILD, _CHILD_CHECKPOINT], ids=["atomic-output", "write-patched"])
def test_sigterm_mid_write_leaves_no_temp_and_no_partial_target(
    tmp_path: Path, old: bytes | None, child: str
) -> None:
    src = _checkpoint(tmp_path)
    target = tmp_path / "out.pt"
    if old is not None:
        target.write_bytes(old)
    before = sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(target), str(src)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        assert any(p.name.endswith(".bnaudit-tmp") for p in tmp_path.iterdir())  # really mid-write
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert code == -signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if old is not None:
        assert target.read_bytes() == old
    np.testing.assert_equal(_leftovers(tmp_path), [])


def test_without_replace_an_existing_companion_refuses_the_whole_output(tmp_path: Path) -> None:
    target, companion = tmp_path / "out.pt", tmp_path / "out.pt.bnaudit.json"
    companion.write_text("someone else's\n")
    staged = AtomicOutput(target, replace=False)
    with pytest.raises(OutputError, match="created by another process"), staged:
        staged.write(b"new")
        staged.add_companion(companion, "{}\n")
        staged.commit()
    assert not target.exists() and companion.read_text() == "someone else's\n"
    assert _leftovers(tmp_path) == []


def test_without_hard_links_a_new_output_is_still_written(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_links(*_args: object) -> None:
        raise OSError(errno.EPERM, "hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.pt"
    with AtomicOutput(target, replace=False) as staged:
        staged.write(b"new")
        staged.commit()
    assert target.read_bytes() == b"new" and _leftovers(tmp_path) == []
