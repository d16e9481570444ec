"""bnaudit recalibrate / drift from the command line, on the committed DDP fixtures and small checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from fixtures import digits
from tests.conftest import FIXTURES, REPO, ShellPayload, run_cli

SORTED0 = FIXTURES / "ddp_nosync_sorted" / "ckpt_rank0.pt"
MODEL = ["--model", "fixtures/digits.py:build_model"]
CALIB = ["--data", "fixtures/digits.py:calibration_data"]
HELDOUT = ["--data", "fixtures/digits.py:heldout_data"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _accuracy(path) -> float:
    model = digits.build_model()
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return digits.evaluate(model)["accuracy"]


def _reference_population(state_dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent float64 statistics of every BN layer's input over the calibration split (hooks here)."""
    model = digits.build_model().double()
    model.load_state_dict(state_dict)
    model.eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()

            def grab(mod, args, name=name):
                x = args[0]
                dims = [0, *range(2, x.dim())]
                inputs.setdefault(name, []).append(x.permute(1, *dims).reshape(x.shape[1], -1))

            hooks.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        for x, _ in digits.calibration_data(batch_size=64):
            model(x.double())
    for h in hooks:
        h.remove()
    out = {}
    for name, chunks in inputs.items():
        values = torch.cat(chunks, dim=1)
        out[name] = (values.mean(1).numpy(), values.var(1, unbiased=True).numpy())
    return out


def _with_payload(source, target, marker):
    """A copy of a fixture checkpoint that also carries a payload creating ``marker`` when unpickled."""
    ckpt = torch.load(source, weights_only=True)
    ckpt["payload"] = ShellPayload(marker)
    torch.save(ckpt, target)
    return target


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("recal") / "fixed.pt"
    before = _sha(SORTED0)
    result = run_cli("recalibrate", str(SORTED0), *MODEL, *CALIB, "-o", str(out), "--format", "json",
                     "--eval", "fixtures/digits.py:evaluate")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _sha(SORTED0) == before
    return out, json.loads(result.stdout)


def test_recalibrated_statistics_match_float64_reference(recalibrated):
    out, _ = recalibrated
    original = torch.load(SORTED0, weights_only=True)
    fixed = torch.load(out, weights_only=True)
    reference = _reference_population(original["model"])
    for layer, (mean, var) in reference.items():
        got_mean = fixed["model"][f"{layer}.running_mean"].double().numpy()
        got_var = fixed["model"][f"{layer}.running_var"].double().numpy()
        std = np.sqrt(var)
        # float32 storage rounding on top of the 1e-6 estimator tolerance
        assert np.all(np.abs(got_mean - mean) <= 1e-6 * std + 1e-6 * np.abs(mean) + 1e-7)
        assert np.all(np.abs(got_var - var) <= 2e-6 * var + 1e-9)


def test_everything_else_is_unchanged(recalibrated):
    out, _ = recalibrated
    original = torch.load(SORTED0, weights_only=True)
    fixed = torch.load(out, weights_only=True)
    assert list(fixed) == list(original)
    for key, value in original["model"].items():
        if key.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(fixed["model"][key], value), key
    assert fixed["epoch"] == original["epoch"] and fixed["args"] == original["args"]
    for a, b in zip(
        original["optimizer"]["state"].values(), fixed["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert zipfile.ZipFile(out).testzip() is None
    assert os.path.getsize(out) == os.path.getsize(SORTED0)
    sidecar = json.loads((out.parent / "fixed.pt.bnaudit.json").read_text())
    assert sidecar["command"] == "recalibrate" and sidecar["inputs"][0]["sha256"] == _sha(SORTED0)


def test_accuracy_recovers_and_drift_flips(recalibrated):
    out, report = recalibrated
    before, after = _accuracy(SORTED0), _accuracy(out)
    assert after > before + 0.05
    evals = report["eval"]["model"]
    assert evals["before"]["accuracy"] == pytest.approx(before) and evals["after"][
        "accuracy"
    ] == pytest.approx(after)
    drift_before = run_cli("drift", str(SORTED0), *MODEL, *HELDOUT, "--format", "json")
    drift_after = run_cli("drift", str(out), *MODEL, *HELDOUT, "--format", "json")
    assert drift_before.returncode == 1, drift_before.stderr
    assert drift_after.returncode == 0, drift_after.stdout
    doc = json.loads(drift_before.stdout)
    assert doc["findings"][0]["kind"] == "drift" and doc["findings"][0]["layer"] == doc["layers"][0]["name"]


def test_refusals_exit_2_and_write_nothing(tmp_path):
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep")
    for args in (
        ["-o", str(existing)],
        ["-o", str(SORTED0), "--force"],
        ["-o", str(tmp_path / "no" / "x.pt")],
    ):
        result = run_cli("recalibrate", str(SORTED0), *MODEL, *CALIB, *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert existing.read_bytes() == b"keep"
    result = run_cli("recalibrate", str(SORTED0), *MODEL, *CALIB)
    assert result.returncode == 2 and "-o OUT" in result.stderr


def test_model_that_does_not_fit_is_exit_2(tmp_path):
    result = run_cli("recalibrate", str(SORTED0), "--model", "fixtures/digits.py:build_model", "--model-arg",
                     "width=8", *CALIB, "-o", str(tmp_path / "x.pt"))  # fmt: skip
    assert result.returncode == 2
    assert "fits the --model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_dry_run_writes_nothing(tmp_path):
    result = run_cli("recalibrate", str(SORTED0), *MODEL, *CALIB, "--dry-run", "-o", str(tmp_path / "x.pt"))
    assert result.returncode == 0, result.stderr
    assert "fc_bn" in result.stdout and list(tmp_path.iterdir()) == []


def test_unsafe_input_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _with_payload(SORTED0, tmp_path / "evil.pt", marker)
    result = run_cli(
        "recalibrate", str(evil), *MODEL, *CALIB, "-o", str(tmp_path / "out.pt"), "--format", "json"
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["findings"][0]["kind"] == "unsafe-pickle"
    assert not (tmp_path / "out.pt").exists() and not marker.exists()


def test_ema_copy_gets_its_own_pass(tmp_path):
    ckpt = torch.load(SORTED0, weights_only=True)
    ema = {k: v.clone() for k, v in ckpt["model"].items()}
    path = tmp_path / "timm.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt["model"].items()}, "state_dict_ema": ema,
                "epoch": 3}, path)  # fmt: skip
    out = tmp_path / "fixed.pt"
    result = run_cli("recalibrate", str(path), *MODEL, *CALIB, "-o", str(out), "--max-batches", "4",
                     "--format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {row["state_dict"] for row in json.loads(result.stdout)["layers"]} == {
        "state_dict",
        "state_dict_ema",
    }
    fixed = torch.load(out, weights_only=True)
    a = fixed["state_dict"]["module.fc_bn.running_var"]
    b = fixed["state_dict_ema"]["fc_bn.running_var"]
    assert torch.allclose(a, b) and not torch.equal(a, ckpt["model"]["fc_bn.running_var"])


@pytest.mark.slow
def test_nproc_and_torchrun_equal_single_process(tmp_path, recalibrated):
    single, _ = recalibrated
    single_sd = torch.load(single, weights_only=True)["model"]
    out_nproc = tmp_path / "nproc.pt"
    result = run_cli(
        "recalibrate", str(SORTED0), *MODEL, *CALIB, "-o", str(out_nproc), "--nproc", "2", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    out_run = tmp_path / "torchrun.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bnaudit",
         "recalibrate", str(SORTED0), *MODEL, *CALIB, "-o", str(out_run)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    for out in (out_nproc, out_run):
        sd = torch.load(out, weights_only=True)["model"]
        for key, value in single_sd.items():
            if key.endswith(("running_mean", "running_var")):
                # The README's bound: the float64 sums merge in another order, so a float32 value may land
                # one unit in the last place away, never more (same sign, adjacent representable values).
                ulps = (sd[key].view(torch.int32).long() - value.view(torch.int32).long()).abs()
                assert int(ulps.max()) <= 1, key


@pytest.mark.slow
def test_nproc_keeps_exit_code_and_one_line_error(tmp_path):
    result = run_cli("recalibrate", str(SORTED0), *MODEL, "--data", "fixtures/digits.py:no_such_loader",
                     "-o", str(tmp_path / "x.pt"), "--nproc", "2")  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("bnaudit:")]
    assert lines and "no_such_loader" in lines[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt", ["json", "sarif", "junit", "markdown", "github"])
def test_drift_speaks_every_format_with_the_same_exit_code(fmt, tmp_path):
    import xml.etree.ElementTree as ET

    report = tmp_path / "report.out"
    result = run_cli("drift", str(SORTED0), *MODEL, *HELDOUT, "--format", fmt, "-o", str(report))
    assert result.returncode == 1, result.stderr
    text = report.read_text()
    if fmt == "json":
        assert json.loads(text)["command"] == "drift"
    elif fmt == "sarif":
        results = json.loads(text)["runs"][0]["results"]
        assert {r["ruleId"] for r in results} >= {"drift"}
    elif fmt == "junit":
        assert ET.fromstring(text).iter("failure")
    elif fmt == "markdown":
        assert "fc_bn" in text
    else:
        assert "::error" in text and "fc_bn" in text


def test_drift_flags_an_unsafe_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = _with_payload(FIXTURES / "ddp_sync" / "ckpt_rank0.pt", tmp_path / "evil.pt", marker)
    result = run_cli("drift", str(evil), *MODEL, *HELDOUT, "--format", "json")
    assert result.returncode == 1, result.stderr
    kinds = [f["kind"] for f in json.loads(result.stdout)["findings"]]
    assert kinds == ["unsafe-pickle"] and not marker.exists()


@pytest.mark.parametrize("command", ["recalibrate", "drift"])
@pytest.mark.parametrize("how", ["truncated", "bad-opcode"])
def test_a_broken_pickle_naming_os_system_is_unsafe_not_corrupt(tmp_path, command, how):
    from tests.audit.test_unsafe_corrupt_pickle import _OS_SYSTEM, _broken
    from tests.checkpoint.ckpt_helpers import rewrite_zip

    with zipfile.ZipFile(SORTED0) as zf:
        entry = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        original = zf.read(entry)
    evil = tmp_path / "evil.pt"
    rewrite_zip(SORTED0, evil, {entry: _broken(original, _OS_SYSTEM, how)})
    out = ["-o", str(tmp_path / "out.pt")] if command == "recalibrate" else []
    result = run_cli(command, str(evil), *MODEL, *(CALIB if command == "recalibrate" else HELDOUT), *out)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if "Traceback" not in line]
    assert "unsafe-pickle" in lines[0] and "'os.system'" in lines[0], result.stderr
    assert "corrupt or truncated" in lines[1] and "Traceback" not in result.stderr
    assert not (tmp_path / "out.pt").exists()
