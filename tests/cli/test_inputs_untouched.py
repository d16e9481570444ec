"""Inputs are never modified: every command, on good and bad inputs, leaves their bytes and times alone and
opens them read-only."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnaudit.cli import cli
from tests.checkpoint.test_dcp import Touch, save_dcp
from tests.cli.test_broken_input import set_header_offset
from tests.conftest import bn_state, call_main, save_ranks
from tests.recal_helpers.models import make_convnet

_HELPERS = "tests.recal_helpers.models"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.exists():
            yield path


def fingerprint(paths: list[Path]) -> dict[Path, tuple[str, int, int]]:
    """sha256, size and mtime (ns) of every file under ``paths``."""
    out = {}
    for f in _files(paths):
        st = f.stat()
        out[f] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def write_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Records every open of a file for writing (builtins.open / io.open / os.open) while the test runs."""
    seen: list[tuple[str, Any]] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | Path) and any(c in mode for c in "wax+"):
            seen.append((str(file), mode))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITE_FLAGS:
            seen.append((str(path), flags))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


@pytest.fixture
def inputs(tmp_path: Path, rng: np.random.Generator) -> dict[str, list[Path]]:
    """Good and bad inputs of every container, by case name."""
    base = tmp_path / "in"
    base.mkdir()
    good = save_ranks(base, [bn_state({"l1": 4, "l2": 3}, rng) for _ in range(2)], name="good")
    far = [good[0], *save_ranks(base, [bn_state({"l1": 4, "l2": 3}, rng, shift=4.0)] * 2, name="far")[1:]]
    other = save_ranks(base, [bn_state({"l9": 2}, rng)] * 2, name="other")
    nan_sd = bn_state({"l1": 4}, rng)
    nan_sd["l1.bn.running_var"][0] = float("nan")
    bad = save_ranks(base, [nan_sd], name="nan")
    legacy = base / "legacy.pt"
    torch.save(bn_state({"l1": 4}, rng), legacy, _use_new_zipfile_serialization=False)
    st = base / "model.safetensors"
    save_file(dict(bn_state({"l1": 4}, rng)), st)
    overlap = base / "overlap.pt"
    overlap.write_bytes(good[1].read_bytes())
    set_header_offset(overlap, "/data/1", like="/data/0")
    truncated = base / "truncated.pt"
    truncated.write_bytes(good[1].read_bytes()[:-200])
    evil = base / "evil.pt"
    torch.save({"model": bn_state({"l1": 4}, rng), "hook": Touch(tmp_path / "pwned")}, evil)
    plain = base / "evil.pkl"
    plain.write_bytes(pickle.dumps(Touch(tmp_path / "pwned")))
    dcps = [save_dcp(base / f"dcp_rank{r}", {"model": bn_state({"l1": 4}, rng), "step": 1}) for r in range(2)]
    convnet = make_convnet().state_dict()
    recal_good, recal_evil = base / "convnet.pt", base / "convnet_evil.pt"
    torch.save({"model": convnet}, recal_good)
    torch.save({"model": convnet, "hook": Touch(tmp_path / "pwned")}, recal_evil)
    return {
        "recal-good": [recal_good],
        "recal-evil": [recal_evil],
        "recal-dcp": [save_dcp(base / "convnet_dcp", {"model": convnet})],
        "good": good,
        "far": far,
        "other-model": [good[0], other[1]],
        "nan": bad,
        "legacy": [legacy],
        "safetensors": [st],
        "overlap": [overlap],
        "truncated": [truncated],
        "evil": [evil],
        "pickle": [plain],
        "dcp": dcps,
    }


def _runs(inputs: dict[str, list[Path]], out: Path) -> Iterator[list[str]]:
    commands = set(cli.commands)
    for name, paths in inputs.items():
        yield ["inspect", "--security", *map(str, paths)]
        if len(paths) == 2:
            yield ["compare", *map(str, paths), "--check-weights", "-o", str(out / f"{name}.txt")]
            if "average" in commands:
                yield ["average", *map(str, paths), "-o", str(out / f"{name}_avg.pt")]
                # Aimed at an input, even with --force: refused, the input intact.
                yield ["average", *map(str, paths), "-o", str(paths[0]), "--force"]
        if "recalibrate" in commands and name.startswith("recal-"):
            spec = ["--model", f"{_HELPERS}:make_convnet", "--data", f"{_HELPERS}:make_batches"]
            yield ["recalibrate", str(paths[0]), *spec, "-o", str(out / f"{name}_recal.pt")]
            yield ["recalibrate", str(paths[0]), *spec, "-o", str(paths[0]), "--force"]
            yield ["drift", str(paths[0]), *spec, "-o", str(out / f"{name}_drift.json"), "--format", "json"]


def test_no_command_modifies_or_opens_an_input_for_writing(
    capsys, tmp_path: Path, inputs: dict[str, list[Path]], write_opens: list[tuple[str, Any]]
) -> None:
    every = [p for paths in inputs.values() for p in paths]
    before = fingerprint(every)
    out = tmp_path / "out"
    out.mkdir()
    codes = []
    for args in _runs(inputs, out):
        code, _, err = call_main(capsys, *args)
        codes.append(code)
        assert code in (0, 1, 2), (args, err)
    assert fingerprint(every) == before
    written_inputs = [(f, m) for f, m in write_opens if Path(f).resolve() in {p.resolve() for p in before}]
    assert written_inputs == []
    assert not (tmp_path / "pwned").exists()
    assert {0, 1, 2} <= set(codes)  # the cases really cover pass, fail and input errors
