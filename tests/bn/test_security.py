"""Pickle globals are classified and reported; a malicious checkpoint is flagged and never executed."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bnaudit.audit.compare import compare_ranks
from bnaudit.audit.inspect import InspectOptions, inspect_checkpoint
from bnaudit.bn.pickle_policy import Safety, classify_global
from bnaudit.report.model import FailOn, FindingKind, Severity
from tests.conftest import ShellPayload, bn_state, run_cli, save_ranks


@pytest.mark.parametrize(
    ("module", "name", "safety"),
    [
        ("torch._utils", "_rebuild_tensor_v2", Safety.SAFE),
        ("collections", "OrderedDict", Safety.SAFE),
        ("torch", "BFloat16Storage", Safety.SAFE),
        ("argparse", "Namespace", Safety.BENIGN),
        ("numpy.core.multiarray", "scalar", Safety.BENIGN),
        ("torch.nn.modules.conv", "Conv2d", Safety.BENIGN),
        ("mypackage.config", "TrainConfig", Safety.UNKNOWN),
        ("posix", "system", Safety.DANGEROUS),
        ("os", "system", Safety.DANGEROUS),
        ("builtins", "eval", Safety.DANGEROUS),
        ("subprocess", "Popen", Safety.DANGEROUS),
        ("runpy", "_run_code", Safety.DANGEROUS),
        ("functools", "partial", Safety.DANGEROUS),
        ("importlib", "import_module", Safety.DANGEROUS),
        ("pickle", "loads", Safety.DANGEROUS),
    ],
)
def test_classification(module, name, safety):
    assert classify_global(module, name) is safety


def _malicious_checkpoint(path, marker, rng):
    torch.save({"model": bn_state({"a": 3}, rng), "payload": ShellPayload(marker)}, path)


def test_malicious_checkpoint_is_flagged_and_not_executed(tmp_path, rng):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _malicious_checkpoint(path, marker, rng)
    report = inspect_checkpoint(path)
    unsafe = [f for f in report.findings if f.kind is FindingKind.UNSAFE_PICKLE]
    assert unsafe and unsafe[0].severity is Severity.ERROR and "system" in unsafe[0].message
    assert report.verdict(FailOn.ERROR) == "fail"
    assert [r.name for r in report.layers] == ["a.bn"]  # still audited, inertly
    assert not marker.exists()


def test_malicious_rank_fails_compare_and_cli_exit_1(tmp_path, rng):
    marker = tmp_path / "pwned"
    good = save_ranks(tmp_path, [bn_state({"a": 3}, rng)])
    _malicious_checkpoint(tmp_path / "ckpt_rank1.pt", marker, rng)
    report = compare_ranks([good[0], tmp_path / "ckpt_rank1.pt"])
    assert any(
        f.kind is FindingKind.UNSAFE_PICKLE and f.file.endswith("ckpt_rank1.pt") for f in report.findings
    )
    for args in (["inspect", str(tmp_path / "ckpt_rank1.pt")], ["compare", str(tmp_path / "ckpt_rank*.pt")]):
        result = run_cli(*args, "--format", "json")
        assert result.returncode == 1, result.stderr
        kinds = {f["kind"] for f in json.loads(result.stdout)["findings"]}
        assert "unsafe-pickle" in kinds
    assert not marker.exists()


def test_benign_and_unknown_globals(tmp_path, rng):
    path = tmp_path / "timm.pt"
    torch.save({"state_dict": bn_state({"a": 3}, rng), "args": argparse.Namespace(lr=0.1)}, path)
    report = inspect_checkpoint(path, InspectOptions(security=True))
    notes = [f for f in report.findings if f.kind is FindingKind.SUSPICIOUS_PICKLE]
    assert [(f.severity, f.tensor) for f in notes] == [(Severity.INFO, "argparse.Namespace")]
    listing = {g.name: g.safety for g in report.globals or ()}
    assert listing["argparse.Namespace"] == "benign" and listing["torch._utils._rebuild_tensor_v2"] == "safe"
    assert report.verdict(FailOn.WARN) == "pass"


def test_python2_names_are_normalised(tmp_path):
    """A pickle that names ``__builtin__.eval`` (Python 2 spelling) is caught as builtins.eval."""
    marker = tmp_path / "m"
    command = f"__import__('os').system('touch {marker}')".encode()
    evil = b"\x80\x02c__builtin__\neval\n(U" + bytes([len(command)]) + command + b"tR."
    raw = tmp_path / "py2.pkl"
    raw.write_bytes(evil)
    report = inspect_checkpoint(raw)
    (finding,) = [f for f in report.findings if f.kind is FindingKind.UNSAFE_PICKLE]
    assert finding.tensor == "builtins.eval"
    assert not marker.exists()
