"""The gate-only install: every command with each optional dependency hidden exits 0/1/2, never 3.

Each run is a real subprocess whose import system refuses the hidden module (a meta-path finder first on
``sys.meta_path`` raising ModuleNotFoundError, which is what a missing package looks like to ``import``),
then runs ``bnaudit.cli.main``. Devices a machine lacks are usage errors naming those it has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, bn_state, save_ranks

HIDE_AND_RUN = """
import sys

class Hide:
    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide(set(sys.argv[1].split(","))))
from bnaudit.cli import main

main(sys.argv[2:])
"""

MODEL_FILE = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
"""

TORCH_HINT = "pip install 'bnaudit[torch]'"
PLOT_HINT = "pip install 'bnaudit[plot]'"


def run_hidden(hidden: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN, hidden, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=180,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("optional")
    save_ranks(folder, [bn_state({"stem": 4, "layer1": 6}, np.random.default_rng(r)) for r in range(2)])
    (folder / "m.py").write_text(MODEL_FILE)
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    torch.save({"model": namespace["model"]().state_dict()}, folder / "live.pt")
    return folder


# command -> (arguments, exit code and stderr text expected with torch hidden, the same with matplotlib hidden)
COMMANDS = {
    "inspect": (["inspect", "ckpt_rank0.pt"], (0, ""), (0, "")),
    "compare": (["compare", "ckpt_rank*.pt", "--fail-on", "never"], (0, ""), (0, "")),
    "average": (["average", "ckpt_rank*.pt", "-o", "{out}/avg.pt"], (0, ""), (0, "")),
    "recalibrate": (
        ["recalibrate", "live.pt", "--model", "m.py:model", "--data", "m.py:data", "-o", "{out}/re.pt"],
        (2, f"bnaudit recalibrate: needs torch, which is not installed; install it: {TORCH_HINT}"),
        (0, ""),
    ),
    "drift": (
        ["drift", "live.pt", "--model", "m.py:model", "--data", "m.py:data", "--fail-on", "never"],
        (2, f"bnaudit drift: needs torch, which is not installed; install it: {TORCH_HINT}"),
        (0, ""),
    ),
    "config": (["config"], (0, ""), (0, "")),
    "--plot": (
        ["compare", "ckpt_rank*.pt", "--fail-on", "never", "--plot", "{out}/p.png"],
        (0, ""),
        (2, f"--plot: needs matplotlib, which is not installed; install it: {PLOT_HINT}"),
    ),
}


@pytest.mark.parametrize("hidden", ["torch", "matplotlib"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_with_each_optional_dependency_hidden(work, tmp_path, command, hidden):
    args, without_torch, without_matplotlib = COMMANDS[command]
    code, message = without_torch if hidden == "torch" else without_matplotlib
    result = run_hidden(hidden, *(a.format(out=tmp_path) for a in args), cwd=work)
    assert result.returncode != 3, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    if code == 2:  # refused before any work: nothing written
        assert list(tmp_path.iterdir()) == []
    elif command in ("average", "recalibrate", "--plot"):
        assert len(list(tmp_path.iterdir())) >= 1


def test_gate_only_commands_give_the_same_report_without_torch(work):
    for args in (["inspect", "ckpt_rank0.pt"], ["compare", "ckpt_rank*.pt", "--format", "json"]):
        hidden = run_hidden("torch", *args, cwd=work)
        plain = run_hidden("nothing", *args, cwd=work)
        assert hidden.returncode == plain.returncode and hidden.stdout == plain.stdout != ""


def test_library_in_training_api_without_torch_names_the_extra(work):
    probe = HIDE_AND_RUN.split("from bnaudit.cli")[0] + (
        "import bnaudit\n"
        "try:\n"
        "    from bnaudit import sync_bn_stats\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc.name, '|', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", probe, "torch"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "MissingDependencyError torch | bnaudit.sync_bn_stats: needs torch, which is not installed; "
        f"install it: {TORCH_HINT}"
    )


def test_a_broken_torch_install_is_a_usage_error(work, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('libtorch_cpu.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "bnaudit", "drift", "live.pt", "--model", "m.py:model", "--data", "m.py:data"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "needs torch, which is installed but cannot be imported" in result.stderr
    assert "libtorch_cpu.so" in result.stderr and TORCH_HINT in result.stderr


def _available() -> str:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ", ".join(["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])])


def _absent_devices() -> list[tuple[str, str]]:
    """(--device, the problem it must report) for devices this machine does not have."""
    cases = [("gpu", "is not a device name"), ("cpu:1", "there is no cpu device number 1")]
    if not torch.backends.mps.is_available():
        cases.append(("mps", "no mps device is available on this machine"))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        cases.append((f"cuda:{n}", f"there is no cuda device number {n}"))
    else:
        absent = "no cuda device is available on this machine"
        cases += [("cuda", absent), ("cuda:7", absent)]
    return cases


@pytest.mark.parametrize(("device", "problem"), _absent_devices())
@pytest.mark.parametrize("command", ["recalibrate", "drift"])
def test_an_unavailable_device_is_exit_2_naming_the_devices_there_are(
    work, tmp_path, command, device, problem
):
    args = [command, "live.pt", "--model", "m.py:model", "--data", "m.py:data", "--device", device]
    args += ["-o", str(tmp_path / "re.pt")] if command == "recalibrate" else []
    result = run_hidden("nothing", *args, cwd=work)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == f"bnaudit: error: --device {device}: {problem}: expected one of: {_available()}"
    )
    assert list(tmp_path.iterdir()) == []


def test_library_recalibrate_refuses_an_unavailable_device():
    from bnaudit.errors import UsageError
    from bnaudit.live.options import RecalibrationOptions
    from bnaudit.live.recalibrate import recalibrate

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    with pytest.raises(UsageError) as exc:
        recalibrate(model, [torch.randn(2, 1, 3, 3)], RecalibrationOptions(device="gpu"))
    assert exc.value.fields.where == "--device gpu" and exc.value.fields.expected == f"one of: {_available()}"
