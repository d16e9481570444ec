"""Counter audit (inspect): num_batches_tracked against the other layers and the stored step counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bnaudit.audit.inspect import inspect_checkpoint
from bnaudit.audit.stored_steps import stored_steps
from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.report.model import FindingKind, Severity
from tests.conftest import REPORT_SCHEMA, call_main

REPO = Path(__file__).resolve().parents[2]
STEPS = 5


class _Net(torch.nn.Module):
    """A stem run normally and a block that may run under reentrant gradient checkpointing."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
        self.block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Linear(4, 2)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = checkpoint(self.block, x, use_reentrant=True) if self.reentrant else self.block(x)
        return self.head(x.mean(dim=(2, 3)))


def _train(
    reentrant: bool, micro_batches: int = 1, optimizer: str = "adam"
) -> tuple[_Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Net(reentrant)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), 1e-3)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), 0.1)
    )
    model.train()
    for _ in range(STEPS):
        for _ in range(micro_batches):
            loss = model(torch.randn(8, 1, 6, 6)).pow(2).mean() / micro_batches
            loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _counter_findings(path: Path):
    return [f for f in inspect_checkpoint(path).findings if f.kind is FindingKind.COUNTER_ANOMALY]


def test_reentrant_checkpointing_counts_twice_per_step(tmp_path):
    model, opt = _train(reentrant=True)
    sd = model.state_dict()
    # The real mechanism: the recomputation in backward updates the checkpointed block's BatchNorm again.
    assert int(sd["block.1.num_batches_tracked"]) == 2 * STEPS
    assert int(sd["stem.1.num_batches_tracked"]) == STEPS
    path = tmp_path / "reentrant.pt"
    torch.save({"model": sd, "optimizer": opt.state_dict()}, path)
    assert [s.steps for s in stored_steps(load_checkpoint(path).root)] == [STEPS]
    (finding,) = _counter_findings(path)
    assert (finding.severity, finding.layer) == (Severity.WARN, "block.1")
    assert (
        f"num_batches_tracked = {2 * STEPS} is twice optimizer param_groups[0] step ({STEPS})"
        in finding.message
    )
    assert "use_reentrant=True" in finding.message and "#96136" in finding.message


def test_reentrant_without_stored_steps_compares_the_layers(tmp_path):
    model, _ = _train(reentrant=True, optimizer="sgd")  # SGD stores no step
    path = tmp_path / "sgd.pt"
    torch.save(model.state_dict(), path)
    (finding,) = _counter_findings(path)
    assert finding.layer == "block.1" and "twice the other layers' count" in finding.message


def test_the_same_run_without_checkpointing_is_clean(tmp_path):
    model, opt = _train(reentrant=False)
    path = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    assert _counter_findings(path) == []


@pytest.mark.parametrize("stored", [False, True])
def test_gradient_accumulation(tmp_path, stored):
    model, opt = _train(reentrant=False, micro_batches=4)
    assert int(model.state_dict()["stem.1.num_batches_tracked"]) == 4 * STEPS
    path = tmp_path / "accum.pt"
    extra = {"args": {"grad_accum_steps": 4}} if stored else {}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, path)
    found = _counter_findings(path)
    if stored:
        assert found == []  # explained by the stored setting
    else:
        (finding,) = found
        assert (
            "4 x optimizer param_groups[0] step (5)" in finding.message and "accumulation" in finding.message
        )


def test_a_counter_of_zero_is_left_to_never_updated(tmp_path):
    model, opt = _train(reentrant=False)
    sd = model.state_dict()
    sd["stem.1.num_batches_tracked"] = torch.tensor(0)  # statistics kept from elsewhere, never updated here
    path = tmp_path / "frozen.pt"
    torch.save({"model": sd, "optimizer": opt.state_dict()}, path)
    report = inspect_checkpoint(path)
    assert [(f.kind, f.severity, f.layer) for f in report.findings] == [
        (FindingKind.NEVER_UPDATED, Severity.INFO, "stem.1")
    ]


def test_epoch_with_steps_per_epoch_either_reading(tmp_path):
    model, _ = _train(reentrant=False, optimizer="sgd")  # counters = 5
    for epoch, clean in ((4, True), (5, True), (2, False)):
        path = tmp_path / f"e{epoch}.pt"
        torch.save({"model": model.state_dict(), "epoch": epoch, "args": {"steps_per_epoch": 1}}, path)
        assert (_counter_findings(path) == []) is clean, epoch


def test_no_counter_finding_on_fixtures_and_study_runs():
    files = sorted(REPO.glob("fixtures/*/*_rank*.*")) + sorted(
        REPO.glob("benchmarks/results/gate_calibration/runs/*/*.pt")
    )
    assert len(files) >= 40
    lightning = [f for f in files if "lightning" in str(f)]
    assert lightning and stored_steps(load_checkpoint(lightning[0]).root)[0].where == "global_step"
    for path in files:
        assert _counter_findings(path) == [], path


def test_json_report_validates(tmp_path, capsys):
    model, opt = _train(reentrant=True)
    path = tmp_path / "r.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    code, out, _ = call_main(capsys, "inspect", str(path), "--format", "json", "--fail-on", "warn")
    assert code == 1
    doc = json.loads(out)
    assert "counter-anomaly" in REPORT_SCHEMA["properties"]["findings"]["items"]["properties"]["kind"]["enum"]
    assert [f["layer"] for f in doc["findings"] if f["kind"] == "counter-anomaly"] == ["block.1"]
    assert {r["name"]: r["severity"] for r in doc["layers"]}["block.1"] == "warn"


def test_lightning_layout_with_optimizer_states_and_global_step(tmp_path):
    model, opt = _train(reentrant=True)
    path = tmp_path / "l.ckpt"
    torch.save(
        {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": STEPS}, path
    )
    steps = stored_steps(load_checkpoint(path).root)
    assert [(s.where, s.steps) for s in steps] == [
        ("optimizer_states[0] param_groups[0] step", STEPS),
        ("global_step", STEPS),
    ]
    (finding,) = _counter_findings(path)
    assert finding.layer == "block.1" and "twice" in finding.message


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "junit", "sarif", "github"])
def test_every_format_carries_the_counter_and_precision_findings(tmp_path, capsys, fmt):
    model, opt = _train(reentrant=True)
    sd = model.state_dict()
    sd["stem.1.running_var"][0] = 1e6  # a channel fp16 cannot hold
    path = tmp_path / "r.pt"
    torch.save({"model": sd, "optimizer": opt.state_dict()}, path)
    code, out, _ = call_main(capsys, "inspect", str(path), "--format", fmt, "--deploy-dtype", "fp16")
    assert code == 1
    for kind in ("counter-anomaly", "precision-overflow"):
        assert kind in out or "".join(p.capitalize() for p in kind.split("-")) in out, kind


@pytest.mark.parametrize(
    "root",
    [
        {"optimizer": {"state": {0: {"step": float("nan")}}, "param_groups": [{"params": 7}]}},
        {"optimizer": {"state": {0: {"step": float("inf")}}, "param_groups": [{"params": [0]}]}},
        {"optimizer": {"state": [1, 2], "param_groups": "x"}, "global_step": -3, "epoch": "e"},
        {"optimizer_states": [None, {"state": {}, "param_groups": [None]}], "global_step": True},
    ],
)
def test_odd_stored_values_are_no_evidence(tmp_path, root):
    model, _ = _train(reentrant=False, optimizer="sgd")
    path = tmp_path / "odd.pt"
    torch.save({"model": model.state_dict(), **root}, path)
    assert stored_steps(load_checkpoint(path).root) == []
    assert _counter_findings(path) == []
