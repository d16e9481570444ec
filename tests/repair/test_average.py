"""bnaudit average: merged statistics against a float64 reference, everything else untouched, refusals."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.zippatch import locate_entries
from bnaudit.repair.average import average_checkpoints
from bnaudit.repair.average_inputs import AverageOptions
from tests.conftest import REPO, bn_state, call_main, run_cli
from tests.training_helpers.userclass import RunInfo

CHANNELS = {"stem": 4, "layer1": 6}
LAYERS = [f"{name}.bn" for name in CHANNELS]


def reference_merge(states: list[dict], prefix: str, layer: str, method: str, weights=None):
    """Independent float64 merge of one layer, straight from the formulas."""
    m = np.stack([s[f"{prefix}{layer}.running_mean"].double().numpy() for s in states])
    v = np.stack([s[f"{prefix}{layer}.running_var"].double().numpy() for s in states])
    w = np.ones(len(states)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = (w[:, None] * m).sum(0) / w.sum()
    if method == "pooled":
        var = (w[:, None] * (v + (m - mean) ** 2)).sum(0) / w.sum()
    else:
        var = (w[:, None] * v).sum(0) / w.sum()
    return mean, var


def rank_states(rng, n=3, prefix=""):
    states = []
    for r in range(n):
        sd = bn_state(CHANNELS, rng, shift=1.5 * r)
        states.append(OrderedDict((prefix + k, v) for k, v in sd.items()))
    return states


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_except(a, b, changed: set[tuple], path=()):
    """Deep equality of two loaded checkpoints, except the tensors at the key paths in ``changed``."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
        for k in a:
            assert_same_except(a[k], b[k], changed, (*path, k))
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_except(x, y, changed, (*path, i))
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if path not in changed:
            assert torch.equal(a, b), path
    elif isinstance(a, argparse.Namespace):
        assert vars(a) == vars(b)
    else:
        assert a == b, path


def assert_bytes_outside_stats(ref: Path, out: Path, sd_names: list[str]):
    ckpt = load_checkpoint(ref)
    allowed = set()
    for name in sd_names:
        for key, t in ckpt.state_dict(name).tensors.items():
            if key.endswith(("running_mean", "running_var")):
                allowed.update(range(*t.byte_span()))
    for entry in locate_entries(ref).values():
        for f in entry.crc_fields:
            allowed.update(range(f, f + 4))
    x, y = np.frombuffer(ref.read_bytes(), np.uint8), np.frombuffer(out.read_bytes(), np.uint8)
    assert x.size == y.size
    assert set(np.flatnonzero(x != y).tolist()) <= allowed
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("method", ["pooled", "mean"])
@pytest.mark.parametrize("weights", [None, [3.0, 3.0, 2.0]])
def test_merged_statistics_match_float64_reference(tmp_path, rng, method, weights):
    states = rank_states(rng)
    paths = []
    for r, sd in enumerate(states):
        paths.append(tmp_path / f"ckpt_rank{r}.pt")
        torch.save({"model": sd, "epoch": 4}, paths[-1])
    out = tmp_path / "avg.pt"
    result = average_checkpoints(
        [str(p) for p in paths], out, AverageOptions(method=method, rank_weights=weights)
    )
    assert result.output == out and result.refused is None
    loaded = torch.load(out, weights_only=True)
    for layer in LAYERS:
        mean, var = reference_merge(states, "", layer, method, weights)
        np.testing.assert_allclose(
            loaded["model"][f"{layer}.running_mean"].numpy(), mean.astype(np.float32), rtol=1e-6
        )
        np.testing.assert_allclose(
            loaded["model"][f"{layer}.running_var"].numpy(), var.astype(np.float32), rtol=1e-6
        )
        assert loaded["model"][f"{layer}.running_var"].dtype == torch.float32
    changed = {("model", f"{layer}.{s}") for layer in LAYERS for s in ("running_mean", "running_var")}
    assert_same_except({"model": states[0], "epoch": 4}, loaded, changed)
    assert_bytes_outside_stats(paths[0], out, ["model"])
    sidecar = json.loads((tmp_path / "avg.pt.bnaudit.json").read_text())
    assert sidecar["method"] == method and sidecar["reference"]["sha256"] == sha(paths[0])
    assert sidecar["weights"] == (weights or [1.0, 1.0, 1.0]) and len(sidecar["inputs"]) == 3
    assert {x["layer"] for x in sidecar["layers"]} == set(LAYERS) and sidecar["output"]["sha256"] == sha(out)
    assert sidecar["layers"][0]["max_kl_before"] > 0


def test_lightning_checkpoint_keeps_everything_else(tmp_path, rng):
    states = rank_states(rng, prefix="model.")
    paths = []
    for r, sd in enumerate(states):
        paths.append(tmp_path / f"epoch=3-rank{r}.ckpt")
        opt_state = {0: {"exp_avg": torch.full((4,), float(r)), "step": torch.tensor(12.0)}}
        torch.save(
            {
                "epoch": 3,
                "global_step": 120,
                "pytorch-lightning_version": "2.4.0",
                "state_dict": sd,
                "loops": {"fit_loop": {"epoch_progress": {"current": 3}}},
                "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.9)}},
                "optimizer_states": [{"state": opt_state, "param_groups": [{"lr": 0.1, "params": [0]}]}],
                "lr_schedulers": [{"last_epoch": 3}],
                "hyper_parameters": {"lr": 0.1, "widths": [4, 6]},
            },
            paths[-1],
        )
    out = tmp_path / "avg.ckpt"
    code, _, err = _call_cli(paths, out)
    assert code == 0, err
    loaded = torch.load(out, weights_only=True)
    original = torch.load(paths[0], weights_only=True)
    changed = {
        ("state_dict", f"model.{layer}.{s}") for layer in LAYERS for s in ("running_mean", "running_var")
    }
    assert_same_except(original, loaded, changed)
    assert next(iter(loaded["state_dict"])).startswith("model.")
    for layer in LAYERS:
        _, var = reference_merge(states, "model.", layer, "pooled")
        np.testing.assert_allclose(
            loaded["state_dict"][f"model.{layer}.running_var"].numpy(), var.astype(np.float32), rtol=1e-6
        )
    assert_bytes_outside_stats(paths[0], out, ["state_dict"])


def _call_cli(paths, out, *extra):
    result = run_cli("average", *map(str, paths), "-o", str(out), *extra)
    return result.returncode, result.stdout, result.stderr


def test_timm_checkpoint_with_ema_namespace_and_user_class(tmp_path, rng):
    states, emas = rank_states(rng), rank_states(rng)
    paths = []
    for r in range(3):
        paths.append(tmp_path / f"checkpoint-7_rank{r}.pth.tar")
        torch.save(
            {
                "epoch": 7,
                "arch": "resnet",
                "state_dict": states[r],
                "state_dict_ema": emas[r],
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": []}]},
                "args": argparse.Namespace(lr=0.05, model="resnet", sync_bn=False),
                "run": RunInfo("exp-1", 0.91),
                "version": 2,
                "metric": 0.91,
            },
            paths[-1],
        )
    out = tmp_path / "fixed.pth.tar"
    code, _, err = _call_cli(paths, out)
    assert code == 0, err  # the user class is a suspicious-pickle warning, not an error
    assert "suspicious" not in err or "RunInfo" in err
    loaded = torch.load(out, weights_only=False)
    original = torch.load(paths[0], weights_only=False)
    changed = {
        (sd, f"{layer}.{s}")
        for sd in ("state_dict", "state_dict_ema")
        for layer in LAYERS
        for s in ("running_mean", "running_var")
    }
    assert_same_except(original, loaded, changed)
    assert loaded["run"] == RunInfo("exp-1", 0.91) and loaded["args"].lr == 0.05
    for sd_name, source in (("state_dict", states), ("state_dict_ema", emas)):
        for layer in LAYERS:
            mean, var = reference_merge(source, "", layer, "pooled")
            np.testing.assert_allclose(
                loaded[sd_name][f"{layer}.running_mean"].numpy(), mean.astype(np.float32), rtol=1e-6
            )
            np.testing.assert_allclose(
                loaded[sd_name][f"{layer}.running_var"].numpy(), var.astype(np.float32), rtol=1e-6
            )
    assert_bytes_outside_stats(paths[0], out, ["state_dict", "state_dict_ema"])
    # --key restricts the merge to one state dict: the EMA keeps rank 0's statistics
    only = tmp_path / "model_only.pth.tar"
    assert _call_cli(paths, only, "--key", "state_dict")[0] == 0
    assert torch.equal(
        torch.load(only, weights_only=False)["state_dict_ema"]["stem.bn.running_var"],
        emas[0]["stem.bn.running_var"],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_ranks_in_their_own_dtype(tmp_path, rng, dtype):
    states = [
        OrderedDict((k, v.to(dtype) if v.is_floating_point() else v) for k, v in s.items())
        for s in rank_states(rng)
    ]
    paths = []
    for r, sd in enumerate(states):
        paths.append(tmp_path / f"model_rank{r}.safetensors")
        save_file(
            {k: v.contiguous() for k, v in sd.items()}, paths[-1], metadata={"format": "pt", "step": "9"}
        )
    out = tmp_path / "avg.safetensors"
    for method in ("pooled", "mean"):
        code, _, err = _call_cli(paths, out, "--method", method, "--force")
        assert code == 0, err
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
            assert meta["format"] == "pt" and meta["step"] == "9"
            assert json.loads(meta["bnaudit"])["method"] == method
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                got = f.get_tensor(key)
                layer, _, leaf = key.rpartition(".")
                if leaf in ("running_mean", "running_var"):
                    mean, var = reference_merge(states, "", layer, method)
                    # written in the tensor's own dtype, rounded as torch rounds float64 (bf16: nearest even)
                    want = torch.tensor(mean if leaf == "running_mean" else var, dtype=torch.float64).to(
                        dtype
                    )
                    assert got.dtype == dtype and torch.equal(got, want), key
                else:
                    assert torch.equal(got, states[0][key]), key


def test_overflowing_value_is_an_error_and_nothing_is_written(tmp_path, rng):
    states = rank_states(rng, n=2)
    for r, sd in enumerate(states):
        sd["stem.bn.running_mean"] = torch.full((4,), 300.0 * (2 * r - 1))  # pooled var = 300^2 > fp16 max
        torch.save(
            {"model": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}},
            tmp_path / f"c_rank{r}.pt",
        )
    code, _, err = _call_cli([tmp_path / "c_rank0.pt", tmp_path / "c_rank1.pt"], tmp_path / "out.pt")
    assert code == 2 and "does not fit float16" in err and "running_var" in err
    assert not (tmp_path / "out.pt").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]


def test_stored_nan_is_refused_naming_layer_and_channel(tmp_path, rng, capsys):
    states = rank_states(rng, n=3)
    states[1]["layer1.bn.running_var"][4] = float("nan")
    code, doc, err, _ = _average_json(capsys, tmp_path, states)
    errors = [(f["kind"], f["layer"], f["channel"]) for f in doc["findings"] if f["severity"] == "error"]
    assert code == 1 and doc["verdict"] == "fail" and doc["average"]["refused"]
    assert ("nonfinite", "layer1.bn", 4) in errors and all(e[1:] == ("layer1.bn", 4) for e in errors)
    assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_rank0.pt", "c_rank1.pt", "c_rank2.pt"]


# ------------------------------------------------------------------------------------------ behaviour


def test_counter_mismatch_warns_and_keeps_reference_counter(tmp_path, rng, capsys):
    states = rank_states(rng, n=2)
    states[1]["stem.bn.num_batches_tracked"] = torch.tensor(99)
    code, doc, _, out = _average_json(capsys, tmp_path, states)
    assert code == 0 and doc["findings"][0]["kind"] == "counter-mismatch"
    assert int(torch.load(out)["model"]["stem.bn.num_batches_tracked"]) == 100
    assert (
        call_main(
            capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(out), "--force", "--fail-on", "warn"
        )[0]
        == 1
    )


def test_overwrite_refusal_and_input_protection(tmp_path, rng, capsys):
    paths = []
    for r, sd in enumerate(rank_states(rng, n=2)):
        paths.append(tmp_path / f"c_rank{r}.pt")
        torch.save({"model": sd}, paths[-1])
    before = [sha(p) for p in paths]
    out = tmp_path / "avg.pt"
    out.write_bytes(b"precious")
    code, _, err = call_main(capsys, "average", *map(str, paths), "-o", str(out))
    assert code == 2 and "--force" in err and out.read_bytes() == b"precious"
    for args in (["-o", str(paths[1])], ["-o", str(paths[0]), "--force"]):
        code, _, err = call_main(capsys, "average", *map(str, paths), *args)
        assert code == 2 and "never writes over an input" in err and len(err.strip().splitlines()) == 1
    os.link(paths[0], tmp_path / "hardlink.pt")  # same file under another name
    code, _, err = call_main(
        capsys, "average", *map(str, paths), "-o", str(tmp_path / "hardlink.pt"), "--force"
    )
    assert code == 2 and "never writes over an input" in err
    code, _, err = call_main(capsys, "average", *map(str, paths), "-o", str(tmp_path / "nowhere" / "a.pt"))
    assert code == 2 and "does not exist" in err
    assert call_main(capsys, "average", *map(str, paths), "-o", str(out), "--force")[0] == 0
    assert [sha(p) for p in paths] == before
    assert call_main(capsys, "average", *map(str, paths))[0] == 2  # -o is required without --dry-run


def test_dry_run_writes_nothing(tmp_path, rng, capsys):
    for r, sd in enumerate(rank_states(rng, n=2)):
        torch.save({"model": sd}, tmp_path / f"c_rank{r}.pt")
    code, out, _ = call_main(
        capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(tmp_path / "a.pt"), "--dry-run"
    )
    assert code == 0 and "Dry run: nothing was written" in out and "stem.bn" in out and "KL before" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_rank0.pt", "c_rank1.pt"]


class Evil:
    """Pickles as a call to os.system: loading it with torch.load(weights_only=False) would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_input_is_refused_and_never_executed(tmp_path, rng, capsys):
    marker = tmp_path / "pwned"
    for r, sd in enumerate(rank_states(rng, n=2)):
        torch.save({"model": sd, "hook": Evil(marker)}, tmp_path / f"c_rank{r}.pt")
    out = tmp_path / "avg.pt"
    code, stdout, err = call_main(capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(out))
    assert code == 1 and "unsafe-pickle" in stdout and "--allow-unsafe-input" in err
    assert not out.exists() and not marker.exists()
    code, _, _ = call_main(
        capsys,
        "average",
        str(tmp_path / "c_rank*.pt"),
        "-o",
        str(out),
        "--allow-unsafe-input",
        "--fail-on",
        "never",
    )
    assert code == 0 and out.exists() and not marker.exists()


def test_different_models_exit_2(tmp_path, rng, capsys):
    torch.save({"model": bn_state(CHANNELS, rng)}, tmp_path / "c_rank0.pt")
    torch.save({"model": bn_state({"stem": 4}, rng)}, tmp_path / "c_rank1.pt")
    code, _, err = call_main(capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(tmp_path / "a.pt"))
    assert code == 2 and "not the same model" in err and len(err.strip().splitlines()) == 1


def test_bad_rank_weights_exit_2(tmp_path, rng, capsys):
    for r, sd in enumerate(rank_states(rng, n=2)):
        torch.save({"model": sd}, tmp_path / f"c_rank{r}.pt")
    for weights in ("1,2,3", "1,x", "1,-2"):
        code, _, err = call_main(
            capsys,
            "average",
            str(tmp_path / "c_rank*.pt"),
            "-o",
            str(tmp_path / "a.pt"),
            "--rank-weights",
            weights,
        )
        assert code == 2 and "--rank-weights" in err


def test_convert_pt_to_safetensors_and_back(tmp_path, rng, capsys):
    states = rank_states(rng, n=2)
    for r, sd in enumerate(states):
        torch.save({"model": sd, "epoch": 1}, tmp_path / f"c_rank{r}.pt")
    st = tmp_path / "avg.safetensors"
    code, _, err = call_main(
        capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(st), "--to", "safetensors"
    )
    assert code == 0 and "dropped top-level entries: epoch" in err
    with safe_open(str(st), framework="pt") as f:
        assert list(f.keys()) == sorted(states[0])  # safetensors lists keys sorted
        mean, var = reference_merge(states, "", "stem.bn", "pooled")
        np.testing.assert_allclose(
            f.get_tensor("stem.bn.running_var").numpy(), var.astype(np.float32), rtol=1e-6
        )
        assert torch.equal(f.get_tensor("stem.conv.weight"), states[0]["stem.conv.weight"])
    for r in range(2):
        save_file({k: v.contiguous() for k, v in states[r].items()}, tmp_path / f"s_rank{r}.safetensors")
    pt = tmp_path / "avg.pt"
    code, _, err = call_main(
        capsys, "average", str(tmp_path / "s_rank*.safetensors"), "-o", str(pt), "--to", "pt"
    )
    assert code == 0, err
    loaded = torch.load(pt, weights_only=True)
    assert set(loaded) == set(states[0]) and torch.equal(
        loaded["stem.conv.weight"], states[0]["stem.conv.weight"]
    )
    np.testing.assert_allclose(loaded["stem.bn.running_mean"].numpy(), mean.astype(np.float32), rtol=1e-6)


def test_interrupt_exit_130_leaves_nothing(tmp_path, rng, capsys, monkeypatch):
    for r, sd in enumerate(rank_states(rng, n=2)):
        torch.save({"model": sd}, tmp_path / f"c_rank{r}.pt")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bnaudit.checkpoint.writer._apply", interrupted)
    code, _, err = call_main(capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(tmp_path / "a.pt"))
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_rank0.pt", "c_rank1.pt"]


def test_failed_verification_exit_3_leaves_nothing(tmp_path, rng, capsys, monkeypatch):
    for r, sd in enumerate(rank_states(rng, n=2)):
        torch.save({"model": sd}, tmp_path / f"c_rank{r}.pt")
    monkeypatch.setattr("bnaudit.checkpoint.writer._verify_zip", _raise_verification)
    code, _, err = call_main(capsys, "average", str(tmp_path / "c_rank*.pt"), "-o", str(tmp_path / "a.pt"))
    assert code == 3 and "verification" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_rank0.pt", "c_rank1.pt"]


def _raise_verification(*args, **kwargs):
    from bnaudit.checkpoint.writer import _verification_failed

    raise _verification_failed(Path("x"), "simulated")


def test_full_disk_exit_2_via_cli(tmp_path, rng):
    for r, sd in enumerate(rank_states(rng, n=2)):
        sd["big"] = torch.zeros(50_000)
        torch.save({"model": sd}, tmp_path / f"c_rank{r}.pt")
    limit = (tmp_path / "c_rank0.pt").stat().st_size // 2
    script = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        "from bnaudit.cli import main\n"
        f"main(['average', {str(tmp_path / 'c_rank*.pt')!r}, '-o', {str(tmp_path / 'a.pt')!r}])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2 and "disk is full" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_rank0.pt", "c_rank1.pt"]


def test_average_never_imports_torch(tmp_path, rng):
    states = rank_states(rng, n=2)
    for r, sd in enumerate(states):
        torch.save({"model": sd}, tmp_path / f"c_rank{r}.pt")
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / f"s_rank{r}.safetensors")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    for args in (
        [str(tmp_path / "c_rank*.pt"), "-o", str(tmp_path / "a.pt")],
        [str(tmp_path / "s_rank*.safetensors"), "-o", str(tmp_path / "a.safetensors")],
        [str(tmp_path / "c_rank*.pt"), "-o", str(tmp_path / "b.safetensors"), "--to", "safetensors"],
    ):
        result = run_cli("average", *args, env=env)
        assert result.returncode == 0, result.stderr
    result = run_cli(
        "average", str(tmp_path / "s_rank*.safetensors"), "-o", str(tmp_path / "c.pt"), "--to", "pt", env=env
    )
    assert result.returncode == 2 and "needs torch" in result.stderr


def test_option_errors_name_the_option_and_the_fix(tmp_path, rng):
    from bnaudit.errors import UsageError

    paths = []
    for r, sd in enumerate(rank_states(rng, n=2)):
        paths.append(tmp_path / f"c_rank{r}.pt")
        torch.save({"model": sd}, paths[-1])
    with pytest.raises(UsageError) as exc:
        average_checkpoints(paths, None, AverageOptions(rank_weights=(1.0, 2.0, 3.0), dry_run=True))
    fields = exc.value.fields
    assert (fields.where, fields.expected, fields.found) == ("--rank-weights", "2 values", "3")
    assert "one sample count per rank" in (fields.fix or "")
    with pytest.raises(UsageError) as exc:
        average_checkpoints(paths, None, AverageOptions(method="median", dry_run=True))
    assert exc.value.fields.where == "--method"
    with pytest.raises(UsageError) as exc:
        average_checkpoints(paths, None)
    assert exc.value.fields.where == "-o" and "--dry-run" in (exc.value.fields.fix or "")


def _average_json(capsys, folder, states):
    """Save ``states`` as ranks c_rank{r}.pt in ``folder``, average them with a JSON report:
    (exit code, report, stderr, the output path)."""
    for r, sd in enumerate(states):
        torch.save({"model": sd}, folder / f"c_rank{r}.pt")
    out = folder / "avg.pt"
    code, stdout, err = call_main(
        capsys, "average", str(folder / "c_rank*.pt"), "-o", str(out), "--format", "json"
    )
    return code, json.loads(stdout), err, out
