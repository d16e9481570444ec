"""The calibration study behind the gate: its committed results, the defaults they chose, and its smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnaudit import defaults
from tests.conftest import REPO

RESULTS = REPO / "benchmarks" / "results" / "gate_calibration"


@pytest.fixture(scope="module")
def rule() -> dict:
    return json.loads((RESULTS / "rule.json").read_text())


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return json.loads((RESULTS / "runs.json").read_text())


def test_the_defaults_are_the_rule_the_study_chose(rule):
    compare, drift = rule["compare"]["rule"], rule["drift"]["rule"]
    assert (compare["summary"], compare["warn"], compare["error"], compare["flat_factor"]) == (
        "mean_channel",
        defaults.DEFAULT_WARN_KL,
        defaults.DEFAULT_ERROR_KL,
        defaults.DEFAULT_FLAT_FACTOR,
    )
    assert (drift["error"], drift["error_kl"], drift["warn_kl"]) == (
        defaults.DEFAULT_DRIFT_NOISE_RATIO,
        defaults.DEFAULT_DRIFT_ERROR_KL,
        defaults.DEFAULT_DRIFT_WARN_KL,
    )


def test_the_matrix_covers_what_the_study_promises(runs):
    configs = [r["config"] for r in runs]
    assert len(configs) >= 30
    assert {c["world_size"] for c in configs} == {2, 4, 8}
    assert {c["arch"] for c in configs} == {"cnn", "rescnn", "mlp"}
    assert {c["dataset"] for c in configs} >= {"digits", "fair"}
    assert {c["sync"] for c in configs} == {"broadcast", "syncbn", "none", "epoch_allreduce"}
    assert {c["shards"] for c in configs} >= {
        "iid",
        "sorted",
        "dirichlet0.1",
        "dirichlet1.0",
        "domain_all",
        "uneven",
    }
    assert {c["framework"] for c in configs} == {"ddp", "lightning"}
    assert {c["batch_size"] for c in configs} >= {8, 64} and len({c["epochs"] for c in configs}) >= 3
    assert {c["half"] for c in configs} == {"tuning", "heldout"}


def test_compare_judges_every_held_out_run_right_and_bnaudit_computes_the_rule(rule):
    held = rule["compare"]["heldout"]
    assert held["wrong"] == [] and held["right"] == held["total"] >= 30
    assert rule["compare"]["tuning"]["wrong"] == []
    # bnaudit's own verdicts, recorded per run, are the rule the study computed independently.
    assert rule["bnaudit_agrees"]["compare"]["differ"] == []


def test_drift_misjudges_only_the_checkpoints_the_readme_names(rule):
    wrong = {
        (w["run"], w["checkpoint"]) for half in ("tuning", "heldout") for w in rule["drift"][half]["wrong"]
    }
    assert wrong == {
        ("mlp-fair-none-dirichlet0.1-w2-b16-e12", "pooled"),
        ("mlp-fair-none-dirichlet0.1-w2-b16-e12", "mean"),
        ("mlp-digits_flat-none-domain_one-w8-b8-e12", "rank0"),
    }
    assert rule["bnaudit_agrees"]["drift"]["differ"] == []


@pytest.mark.slow
def test_the_study_runs_end_to_end_in_smoke_mode(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gate_calibration.py"),
            "--smoke",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert [r["config"]["name"] for r in records] == [
        "smoke-broadcast-iid",
        "smoke-none-sorted",
        "smoke-none-iid",
    ]
    for record in records:  # every rank's accuracy, both averages and the recalibrated checkpoint
        assert len(record["rank_accuracy"]) == 2 and set(record["repaired_accuracy"]) == {
            "pooled",
            "mean",
            "recalibrated",
        }
        assert set(record["drift"]) == {"rank0", "rank1", "pooled", "mean", "recalibrated"}
    for name in ("runs.csv", "rule.json", "table.md", "plot.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_the_committed_rule_and_tables_follow_from_the_committed_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.json").write_bytes((RESULTS / "runs.json").read_bytes())
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gate_calibration.py"), "--analyse", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("rule.json", "runs.csv", "table.md"):
        assert (out / name).read_text() == (RESULTS / name).read_text(), name
