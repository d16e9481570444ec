"""Copy audit (inspect): EMA / SWA copies whose BatchNorm statistics are not their own (stale-copy)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from bnaudit.audit.inspect import InspectOptions, inspect_checkpoint
from bnaudit.report.model import FindingKind, Severity
from tests.conftest import call_main

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 2),
    )


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(8, 1, 6, 6, generator=gen) * 2 + 1 for _ in range(STEPS)]


def _train(model: torch.nn.Module, after_step) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for x in _batches():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        after_step()


def _stale(path: Path, **options):
    return [
        f
        for f in inspect_checkpoint(path, InspectOptions(**options)).findings
        if f.kind is FindingKind.STALE_COPY
    ]


def test_averaged_model_without_buffers_keeps_the_live_statistics(tmp_path):
    model = _model()
    swa = AveragedModel(model, use_buffers=False)
    _train(model, lambda: swa.update_parameters(model))
    # The real mechanism (torch 2.13): use_buffers=False copies the live buffers at every update, so the
    # averaged weights carry the last model's statistics until update_bn runs.
    assert torch.equal(swa.module[1].running_var, model[1].running_var)
    assert not torch.equal(swa.module[1].weight, model[1].weight)
    path = tmp_path / "swa.pt"
    torch.save({"model": model.state_dict(), "swa_model": swa.state_dict()}, path)
    (finding,) = _stale(path)
    assert (finding.severity, finding.state_dict) == (Severity.WARN, "swa_model")
    assert "averaged (SWA) copy 'swa_model'" in finding.message
    assert "not recomputed after averaging" in finding.message
    assert f"bnaudit recalibrate {path} --key swa_model --model" in finding.message

    # The fix, done the torch way: update_bn recomputes the statistics for the averaged weights.
    update_bn(_batches(), swa)
    torch.save({"model": model.state_dict(), "swa_model": swa.state_dict()}, path)
    assert _stale(path) == []


def test_parameters_only_ema_keeps_initial_statistics(tmp_path):
    model = _model()
    ema = copy.deepcopy(model)

    def update() -> None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.mul_(0.9).add_(p, alpha=0.1)

    _train(model, update)
    assert torch.equal(ema[1].running_mean, torch.zeros(4)) and torch.equal(ema[1].running_var, torch.ones(4))
    path = tmp_path / "ema0.pt"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict()}, path)
    (finding,) = _stale(path)
    assert finding.state_dict == "model_ema"
    assert "initial values (mean 0, var 1) in all 1 layers" in finding.message
    assert "--key model_ema" in finding.message


def _ema_run(copy_buffers: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = _model()
    ema = copy.deepcopy(model)

    def update() -> None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.mul_(0.9).add_(p, alpha=0.1)
            for e, b in zip(ema.buffers(), model.buffers(), strict=True):
                if copy_buffers or not e.is_floating_point():
                    e.copy_(b)  # the bug: the live statistics copied into the average
                else:
                    e.mul_(0.9).add_(b, alpha=0.1)

    _train(model, update)
    return model, ema


def test_ema_whose_statistics_were_copied(tmp_path):
    model, ema = _ema_run(copy_buffers=True)
    assert torch.equal(ema[1].running_var, model[1].running_var)
    assert not torch.equal(ema[1].weight, model[1].weight)
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    (finding,) = _stale(path)
    assert finding.state_dict == "state_dict_ema"
    assert "bit-identical to the live model's in all 1 layers" in finding.message
    assert "copied from the live model instead of averaged" in finding.message
    assert "--key state_dict_ema" in finding.message


def test_found_by_structure_not_name(tmp_path):
    model, ema = _ema_run(copy_buffers=True)
    path = tmp_path / "teacher.pt"
    torch.save({"student": model.state_dict(), "teacher": ema.state_dict()}, path)
    assert [f.state_dict for f in _stale(path)] == ["teacher"]


def test_properly_averaged_ema_is_clean(tmp_path):
    model, ema = _ema_run(copy_buffers=False)
    path = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    assert _stale(path) == []
    # A second identical copy (weights equal too) is not stale either.
    torch.save({"state_dict": model.state_dict(), "model": model.state_dict()}, path)
    assert _stale(path) == []


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "junit", "sarif", "github"])
def test_every_format_carries_the_finding(tmp_path, capsys, fmt):
    model, ema = _ema_run(copy_buffers=True)
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    code, out, _ = call_main(capsys, "inspect", str(path), "--format", fmt, "--fail-on", "warn")
    assert code == 1
    assert "stale-copy" in out or "StaleCopy" in out
    if fmt == "json":
        assert [f["state_dict"] for f in json.loads(out)["findings"] if f["kind"] == "stale-copy"] == [
            "state_dict_ema"
        ]


def test_lightning_averaging_callback_state_is_a_copy(tmp_path):
    # Lightning's StochasticWeightAveraging keeps its averaged model under callbacks/<name>/average_model_state.
    model, ema = _ema_run(copy_buffers=True)
    path = tmp_path / "lightning.ckpt"
    callbacks = {
        "StochasticWeightAveraging{'swa_lrs': 0.01}": {
            "n_averaged": 3,
            "average_model_state": ema.state_dict(),
        }
    }
    torch.save(
        {"epoch": 2, "global_step": STEPS, "state_dict": model.state_dict(), "callbacks": callbacks}, path
    )
    (finding,) = _stale(path)
    assert finding.state_dict.endswith("/average_model_state")
    assert "averaged (SWA) copy" in finding.message and "not recomputed after averaging" in finding.message


def test_the_command_in_the_message_fixes_the_copy(tmp_path, capsys):
    model = _model()
    swa = AveragedModel(model, use_buffers=False)
    _train(model, lambda: swa.update_parameters(model))
    path = tmp_path / "swa.pt"
    torch.save({"model": model.state_dict(), "swa_model": swa.state_dict()}, path)
    (finding,) = _stale(path)
    spec = tmp_path / "spec.py"
    spec.write_text(
        "import torch\n"
        "from tests.audit.test_copies import _batches, _model\n"
        "def build():\n    return _model()\n"
        "def data():\n    return _batches()\n"
    )
    command = finding.message.split("bnaudit ", 1)[1].split()  # recalibrate FILE --key KEY --model ... -o OUT
    fixed = tmp_path / "fixed.pt"
    argv = [
        w.replace("MODULE:FACTORY", f"{spec}:build").replace("MODULE:LOADER", f"{spec}:data") for w in command
    ]
    argv[-1] = str(fixed)
    assert argv[:4] == ["recalibrate", str(path), "--key", "swa_model"]
    code, _, err = call_main(capsys, *argv, "--quiet")
    assert code == 0, err
    assert _stale(fixed) == []
