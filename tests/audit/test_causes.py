"""Every compare verdict explains its likely cause; each cause checked on real runs of the calibration study.

The runs in benchmarks/results/gate_calibration/runs/ are copies of study runs (real torchrun training,
benchmarks/gate_calibration.py); what each must be called follows from how it was trained (its run.json),
and the bit-identity of synchronised ranks is checked here with torch.
"""

from __future__ import annotations

import json

import pytest
import torch

from bnaudit.audit.compare import compare_ranks
from bnaudit.report.json_format import report_to_dict
from bnaudit.report.model import FailOn
from tests.conftest import REPO, run_cli

RUNS = REPO / "benchmarks" / "results" / "gate_calibration" / "runs"


def _run(name: str):
    folder = RUNS / name
    config = json.loads((folder / "run.json").read_text())["config"]
    return folder, config, compare_ranks(str(folder / "ckpt_rank*.pt"))


def _statistics(folder, rank: int) -> dict[str, torch.Tensor]:
    payload = torch.load(folder / f"ckpt_rank{rank}.pt", weights_only=False)
    state = payload.get("model") or payload["state_dict"]
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize(
    "name", ["mlp-fair-syncbn-sorted-w8-b32-e20", "mlp-fair-epoch_allreduce-sorted-w4-b8-e6"]
)
def test_synchronised_ranks_are_bit_identical(name):
    folder, config, report = _run(name)
    first = _statistics(folder, 0)
    assert all(
        torch.equal(first[k], other[k])
        for r in range(1, config["world_size"])
        for other in [_statistics(folder, r)]
        for k in first
    )
    assert report.verdict(FailOn.ERROR) == "pass" and report.counts()["warn"] == 0
    assert report.cause is not None and report.cause.kind == "ranks-identical"
    # Both runs store timm's arguments: the cause names what they say.
    said = "SyncBatchNorm was on" if config["sync"] == "syncbn" else "reduced across ranks at each epoch"
    assert said in report.cause.summary
    assert any(e.startswith("args.") for e in report.cause.evidence)


def test_broadcast_ranks_are_one_step_apart_and_the_stored_settings_say_so():
    _, config, report = _run("mlp-fair-broadcast-iid-w4-b32-e12")
    assert config["sync"] == "broadcast" and config["layout"] == "timm"
    assert report.verdict(FailOn.ERROR) == "pass" and report.counts()["warn"] == 0
    assert report.cause is not None and report.cause.kind == "ranks-nearly-equal"
    assert (
        "DDP broadcast rank 0's buffers" in report.cause.summary and "bnaudit drift" in report.cause.summary
    )
    assert "args.no_ddp_bb=False" in report.cause.evidence


def test_uneven_shards_are_counters_that_differ():
    folder, config, report = _run("mlp-fair-none-uneven-w4-b64-e12")
    counters = {
        int(torch.load(folder / f"ckpt_rank{r}.pt", weights_only=True)["model"]["bn1.num_batches_tracked"])
        for r in range(config["world_size"])
    }
    assert len(counters) == config["world_size"]  # shards of sizes 1:2:3:4 took 1:2:3:4 steps
    assert report.cause is not None and report.cause.kind == "counters-differ"
    assert "num_batches_tracked" in report.cause.evidence[-1]


def test_label_sorted_shards_diverge_more_with_depth():
    _, config, report = _run("cnn-digits-none-sorted-w4-b32-e6")
    assert (config["sync"], config["shards"]) == ("none", "sorted")
    assert report.verdict(FailOn.ERROR) == "fail"
    assert report.cause is not None and report.cause.kind == "buffers-unsynchronised"
    assert "grows with depth" in report.cause.summary
    assert "'block1.bn'" in report.cause.evidence[-1]


def test_per_node_input_domains_diverge_most_at_the_first_layer():
    _, config, report = _run("mlp-fair-none-domain_all-w8-b64-e20")
    assert config["shards"] == "domain_all"
    assert report.verdict(FailOn.ERROR) == "fail"
    assert report.cause is not None and "largest at the first BatchNorm layer" in report.cause.summary


def test_one_node_with_other_data_is_an_outlier_rank():
    _, config, report = _run("rescnn-digits-none-domain_one-w4-b32-e6")
    assert config["shards"] == "domain_one"  # only the last node records its inputs differently
    assert report.verdict(FailOn.ERROR) == "fail"
    assert report.cause is not None
    assert f"rank {config['world_size'] - 1} diverges" in report.cause.summary


def test_lightning_hyper_parameters_are_evidence_and_the_json_carries_the_cause():
    folder, config, report = _run("rescnn-digits-none-sorted-w2-b32-e12-lightning")
    assert config["framework"] == "lightning"
    assert report.verdict(FailOn.ERROR) == "fail"
    assert report.cause is not None and "broadcast_buffers=False" in report.cause.summary
    assert "hyper_parameters.broadcast_buffers=False" in report.cause.evidence
    doc = report_to_dict(report, FailOn.ERROR)
    assert doc["cause"] == {
        "kind": "buffers-unsynchronised",
        "summary": report.cause.summary,
        "evidence": list(report.cause.evidence),
    }
    table = run_cli("compare", str(folder / "ckpt_rank*.pt"))
    assert table.returncode == 1 and f"Cause: {report.cause.summary}" in table.stdout


STUDY = REPO / "benchmarks" / "calibration"


def _drift_spec(config: dict, split: str):
    from bnaudit.live.options import CalibrationSpec

    return CalibrationSpec(
        model=f"{STUDY / 'models.py'}:build",
        data=f"{STUDY / 'data.py'}:batches",
        model_kwargs={"arch": config["arch"], "dataset": config["dataset"]},
        data_kwargs={
            "dataset": config["dataset"],
            "split_name": split,
            "shift": "none",
            "world_size": 4,
            "batch_size": 25,
        },
    )


def test_drift_names_drifted_statistics_and_passes_them_once_recalibrated(tmp_path):
    from bnaudit.audit.drift import drift_checkpoint
    from bnaudit.repair.recalibrate import recalibrate_checkpoint

    folder, config, _ = _run("cnn-digits-none-sorted-w4-b32-e6")
    rank0 = folder / "ckpt_rank0.pt"
    before = drift_checkpoint(rank0, _drift_spec(config, "drift")).report
    assert before.verdict(FailOn.ERROR) == "fail"
    assert before.cause is not None and before.cause.kind == "statistics-drifted"
    assert "do not fit the final weights" in before.cause.summary
    fixed = tmp_path / "fixed.pt"
    recalibrate_checkpoint(rank0, _drift_spec(config, "calib"), fixed)
    after = drift_checkpoint(fixed, _drift_spec(config, "drift")).report
    assert after.verdict(FailOn.ERROR) == "pass"
    assert after.cause is not None and after.cause.kind == "statistics-current"
