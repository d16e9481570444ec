"""bnaudit diff: per-layer change between two checkpoints, and --frozen layers that moved."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import bnaudit.bn.layerstats as layerstats
from bnaudit.audit.diff import diff_checkpoints
from bnaudit.audit.options import DiffOptions
from bnaudit.report.model import FindingKind, Severity
from tests.conftest import REPORT_SCHEMA, call_main

STEPS = 7
EPS = 1e-5


def _net() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3), torch.nn.BatchNorm1d(3))
    return torch.nn.ModuleDict({"backbone": backbone, "head": head})


def _forward(model: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return model["head"](model["backbone"](x))


def _fine_tune(tmp_path: Path, backbone_eval: bool) -> tuple[Path, Path, dict, dict]:
    """Pretrain briefly, save BASE; freeze the backbone (requires_grad False), fine-tune the head on new data
    (a shifted distribution), save CKPT. ``backbone_eval``: the fix, the backbone put in eval mode."""
    model = _net()
    gen = torch.Generator().manual_seed(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        _forward(model, torch.randn(16, 1, 6, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model["backbone"].parameters():
        p.requires_grad_(False)
    head_opt = torch.optim.SGD(model["head"].parameters(), lr=0.05)
    for _ in range(STEPS):
        model.train()
        if backbone_eval:
            model["backbone"].eval()
        x = torch.randn(16, 1, 6, 6, generator=gen) * 3 + 2  # the fine-tuning data differ
        _forward(model, x).pow(2).mean().backward()
        head_opt.step()
        head_opt.zero_grad()
    after = model.state_dict()
    torch.save({"model": base}, tmp_path / "base.pt")
    torch.save({"model": after}, tmp_path / "tuned.pt")
    return tmp_path / "base.pt", tmp_path / "tuned.pt", base, after


def _expected(base: dict, after: dict, prefix: str) -> dict[str, float]:
    """The diff metrics of one layer, computed here in float64 from the torch tensors."""
    mb, vb = (
        base[f"{prefix}.running_mean"].double().numpy(),
        base[f"{prefix}.running_var"].double().numpy() + EPS,
    )
    mn, vn = (
        after[f"{prefix}.running_mean"].double().numpy(),
        after[f"{prefix}.running_var"].double().numpy() + EPS,
    )
    kl = 0.5 * (vb / vn - 1 - np.log(vb / vn) + (mb - mn) ** 2 / vn)
    return {
        "mean_kl": kl.mean(),
        "max_kl": kl.max(),
        "max_shift": (np.abs(mn - mb) / np.sqrt(vb)).max(),
        "max_var_ratio": np.maximum(vn / vb, vb / vn).max(),
        "counter_delta": int(after[f"{prefix}.num_batches_tracked"])
        - int(base[f"{prefix}.num_batches_tracked"]),
        "weight_change": float(
            np.abs(
                after[f"{prefix}.weight"].double().numpy() - base[f"{prefix}.weight"].double().numpy()
            ).max()
        ),
    }


def test_frozen_backbone_left_in_train_mode_is_caught(tmp_path):
    base_path, tuned_path, base, after = _fine_tune(tmp_path, backbone_eval=False)
    # The real mechanism (pytorch #86590): requires_grad False does not stop the statistics.
    assert not torch.equal(base["backbone.1.running_mean"], after["backbone.1.running_mean"])
    assert torch.equal(base["backbone.1.weight"], after["backbone.1.weight"])
    report = diff_checkpoints(base_path, tuned_path, DiffOptions(frozen=("backbone.*",)))
    (finding,) = report.findings
    assert (finding.severity, finding.kind, finding.layer) == (
        Severity.ERROR,
        FindingKind.FROZEN_CHANGED,
        "backbone.1",
    )
    assert "matches --frozen 'backbone.*'" in finding.message
    assert f"num_batches_tracked 3 -> {3 + STEPS}" in finding.message
    assert (
        "weight" not in finding.message.split(" — ")[0].split("changed: ")[1]
    )  # the parameters did not move
    rows = {r.name: r for r in report.layers}
    assert rows["backbone.1"].severity is Severity.ERROR and rows["head.2"].severity is Severity.OK
    for name in ("backbone.1", "head.2"):
        expected = _expected(base, after, name)
        assert rows[name].metrics["counter_delta"] == expected.pop("counter_delta") == STEPS
        for key, value in expected.items():
            assert rows[name].metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
    assert rows["head.2"].metrics["weight_change"] > 0


def test_the_fix_passes(tmp_path):
    base_path, tuned_path, *_ = _fine_tune(tmp_path, backbone_eval=True)
    report = diff_checkpoints(base_path, tuned_path, DiffOptions(frozen=("backbone.*",)))
    assert report.findings == ()
    row = next(r for r in report.layers if r.name == "backbone.1")
    assert row.metrics["counter_delta"] == 0 and row.metrics["mean_kl"] == 0.0
    assert row.metrics["max_var_ratio"] == 1.0


def test_reads_only_batchnorm_tensors(tmp_path, monkeypatch):
    base_path, tuned_path, *_ = _fine_tune(tmp_path, backbone_eval=False)
    seen: list[str] = []
    real = layerstats.read_tensors

    def recording(refs, path=None):
        seen.extend(r.storage.key for r in refs)
        return real(refs, path)

    monkeypatch.setattr(layerstats, "read_tensors", recording)
    diff_checkpoints(base_path, tuned_path)
    # 2 layers x 5 tensors x 2 files; the conv and linear weights are never read.
    assert len(seen) == 20


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "junit", "sarif", "github"])
def test_cli_every_format(tmp_path, capsys, fmt):
    base_path, tuned_path, *_ = _fine_tune(tmp_path, backbone_eval=False)
    code, out, err = call_main(
        capsys, "diff", str(base_path), str(tuned_path), "--frozen", "backbone.*", "--format", fmt
    )
    assert code == 1, err
    assert "frozen-changed" in out or "FrozenChanged" in out
    if fmt == "json":
        doc = json.loads(out)
        jsonschema.validate(doc, REPORT_SCHEMA)
        assert doc["command"] == "diff" and doc["settings"]["frozen"] == ["backbone.*"]
    code, _, _ = call_main(capsys, "diff", str(base_path), str(tuned_path), "--format", fmt)
    assert code == 0


def test_cli_baseline_config_and_bad_input(tmp_path, capsys, monkeypatch):
    _fine_tune(tmp_path, backbone_eval=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()
    args = ("diff", "base.pt", "tuned.pt", "--frozen", "backbone.*")
    assert call_main(capsys, *args, "--write-baseline", "accepted.json")[0] == 1
    assert call_main(capsys, *args, "--baseline", "accepted.json")[0] == 0
    (tmp_path / "pyproject.toml").write_text('[tool.bnaudit.diff]\nfrozen = ["backbone.*"]\n')
    assert call_main(capsys, "diff", "base.pt", "tuned.pt")[0] == 1
    assert call_main(capsys, "--no-config", "diff", "base.pt", "tuned.pt")[0] == 0
    for bad, words in (
        (("diff", "base.pt"), "Missing argument 'CHECKPOINT'"),
        (("diff", "base.pt", "missing.pt"), "missing.pt"),
        (
            ("--no-config", "diff", "base.pt", "tuned.pt", "--frozen", "nothing*"),
            "matches no BatchNorm layer",
        ),
        (("diff", "base.pt", "tuned.pt", "-o", "tuned.pt", "--format", "json"), "input"),
        (("diff", "base.pt", "tuned.pt", "-o", "base.pt", "--format", "json"), "input"),
    ):
        code, _, err = call_main(capsys, *bad)
        assert code == 2 and words in err, (bad, err)
    other = torch.nn.BatchNorm1d(5).state_dict()
    torch.save(other, tmp_path / "other.pt")
    code, _, err = call_main(capsys, "--no-config", "diff", "base.pt", "other.pt")
    assert code == 2 and "the same BatchNorm layers" in err


def test_affine_in_one_checkpoint_only_is_a_change(tmp_path, capsys):
    with_affine = torch.nn.BatchNorm1d(3).state_dict()
    without = torch.nn.BatchNorm1d(3, affine=False).state_dict()
    torch.save(with_affine, tmp_path / "a.pt")
    torch.save(without, tmp_path / "b.pt")
    (finding,) = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", DiffOptions(frozen=("*",))).findings
    changed = finding.message.split("changed: ")[1].split(" — ")[0]
    assert changed == "weight (in one checkpoint only); bias (in one checkpoint only)"
