"""Shared fixtures: small checkpoints written by the real torch.save / safetensors in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


class ShellPayload:
    """Pickled into a checkpoint: unpickling it with torch.load(weights_only=False) would run
    ``touch marker`` through os.system (bnaudit must never create the marker)."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def bn_state(channels: dict[str, int], rng: np.random.Generator, shift: float = 0.0) -> OrderedDict:
    """A state dict of conv + BatchNorm layers with random statistics (mean shifted by ``shift``)."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, c in channels.items():
        sd[f"{name}.conv.weight"] = torch.ones(c, 1, 1, 1)
        sd[f"{name}.bn.weight"] = torch.linspace(0.5, 1.5, c)
        sd[f"{name}.bn.bias"] = torch.linspace(-0.1, 0.1, c)
        sd[f"{name}.bn.running_mean"] = torch.tensor(rng.normal(size=c) + shift, dtype=torch.float32)
        sd[f"{name}.bn.running_var"] = torch.tensor(rng.uniform(0.5, 2.0, size=c), dtype=torch.float32)
        sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(100)
    return sd


def save_ranks(folder: Path, states: list[dict], layout: str = "model", name: str = "ckpt") -> list[Path]:
    """Save one file per rank as ``{name}_rank{r}.pt``, laid out as ``{"model": ..., "epoch": ...}``."""
    paths = []
    for r, sd in enumerate(states):
        path = folder / f"{name}_rank{r}.pt"
        torch.save({layout: sd, "epoch": 3} if layout else sd, path)
        paths.append(path)
    return paths


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


REPORT_SCHEMA = json.loads((REPO / "bnaudit" / "schemas" / "report-v1.json").read_text())


def call_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``bnaudit.cli.main`` in-process; return (exit code, stdout, stderr)."""
    from bnaudit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bnaudit`` in a subprocess (the way users run it)."""
    return subprocess.run(
        [sys.executable, "-m", "bnaudit", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=120,
    )
