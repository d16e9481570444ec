"""average / recalibrate on folder checkpoints: Hugging Face sharded folders and torch.distributed.checkpoint
folders repaired into new folders, read back by their own loaders (safetensors, dcp.load) with exact
statistics; the folder output policy and atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

import bnaudit.checkpoint.folder_writer as folder_writer
from bnaudit.checkpoint.patch_verify import verification_failed
from tests.checkpoint.test_dcp import save_dcp
from tests.conftest import call_main
from tests.recal_helpers.models import make_convnet
from tests.repair.test_average import CHANNELS, LAYERS, rank_states, reference_merge
from tests.repair.test_recalibrate import SPEC, _assert_exact

INDEX = "model.safetensors.index.json"
STATS_SHARD = "model-00002-of-00002.safetensors"
PLAIN_SHARD = "model-00001-of-00002.safetensors"


def save_sharded(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A sharded folder as save_pretrained lays it out: conv weights in shard 1, BatchNorm in shard 2."""
    folder.mkdir()
    shards = {
        PLAIN_SHARD: [k for k in state if ".bn." not in k],
        STATS_SHARD: [k for k in state if ".bn." in k],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "test"}')
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def expected_stats(states: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for layer in LAYERS:
        mean, var = reference_merge(states, "", layer, "pooled")
        out[f"{layer}.running_mean"], out[f"{layer}.running_var"] = mean, var
    return out


@pytest.mark.parametrize("as_index", [False, True])
def test_sharded_folder_averaged_into_a_new_folder(tmp_path, rng, capsys, as_index):
    states = rank_states(rng)
    folders = [save_sharded(tmp_path / f"rank{r}", s) for r, s in enumerate(states)]
    before = [digests(f) for f in folders]
    args = [str(f / INDEX) if as_index else str(f) for f in folders]
    out = tmp_path / "fixed"
    code, _, err = call_main(capsys, "average", *args, "-o", str(out))
    assert code == 0, err
    assert [digests(f) for f in folders] == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folders[0].iterdir())
    written = digests(out)
    for same in (INDEX, "config.json", PLAIN_SHARD):
        assert written[same] == before[0][same], same
    assert written[STATS_SHARD] != before[0][STATS_SHARD]
    with safe_open(out / STATS_SHARD, "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        assert f.metadata()["format"] == "pt" and "bnaudit" in json.dumps(f.metadata())
    for key, value in expected_stats(states).items():
        np.testing.assert_array_equal(got[key].numpy(), value.astype(np.float32))
    for key, value in states[0].items():
        if ".bn." in key and not key.endswith(("running_mean", "running_var")):
            assert torch.equal(got[key], value), key
    sidecar = json.loads((tmp_path / "fixed.bnaudit.json").read_text())
    assert sidecar["output"]["path"] == str(out) and sidecar["patched_bytes"] == 4 * 2 * sum(
        CHANNELS.values()
    )
    assert not [p for p in tmp_path.iterdir() if "bnaudit-tmp" in p.name]


def _dcp_states(rng, n=3):
    return [{"model": s, "step": 5} for s in rank_states(rng, n)]


def _dcp_load(folder: Path, like: dict) -> dict:
    template = {"model": {k: torch.zeros_like(v) for k, v in like["model"].items()}}
    template.update({k: 0 for k in like if k != "model"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=folder, no_dist=True)
    return template


def test_dcp_folders_averaged_into_a_folder_dcp_load_reads(tmp_path, rng, capsys):
    states = _dcp_states(rng)
    folders = [save_dcp(tmp_path / f"dcp_rank{r}", s) for r, s in enumerate(states)]
    before = [digests(f) for f in folders]
    out = tmp_path / "fixed_dcp"
    code, _, err = call_main(capsys, "average", *map(str, folders), "-o", str(out))
    assert code == 0, err
    assert [digests(f) for f in folders] == before
    assert digests(out)[".metadata"] == before[0][".metadata"]
    loaded = _dcp_load(out, states[0])
    for key, value in expected_stats([s["model"] for s in states]).items():
        np.testing.assert_array_equal(loaded["model"][key].numpy(), value.astype(np.float32))
    for key, value in states[0]["model"].items():
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(loaded["model"][key], value), key
    assert loaded["step"] == 5


def test_recalibrate_dcp_and_sharded_folders_exact(tmp_path, capsys):
    state = make_convnet().state_dict()
    spec = ["--model", SPEC.model, "--data", SPEC.data]
    folder = save_dcp(tmp_path / "convnet_dcp", {"model": state})
    code, _, err = call_main(capsys, "recalibrate", str(folder), *spec, "-o", str(tmp_path / "recal_dcp"))
    assert code == 0, err
    _assert_exact(_dcp_load(tmp_path / "recal_dcp", {"model": state})["model"])
    sharded = tmp_path / "convnet_hf"
    sharded.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, sharded / STATS_SHARD)
    (sharded / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(state, STATS_SHARD)}))
    code, _, err = call_main(capsys, "recalibrate", str(sharded), *spec, "-o", str(tmp_path / "recal_hf"))
    assert code == 0, err
    with safe_open(tmp_path / "recal_hf" / STATS_SHARD, "pt") as f:
        _assert_exact({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118


def test_folder_output_policy(tmp_path, rng, capsys):
    folders = [save_sharded(tmp_path / f"rank{r}", s) for r, s in enumerate(rank_states(rng, 2))]
    args = ["average", *map(str, folders)]
    before = digests(folders[0])
    out = tmp_path / "fixed"
    assert call_main(capsys, *args, "-o", str(out))[0] == 0
    first = digests(out)
    code, _, err = call_main(capsys, *args, "-o", str(out))
    assert code == 2 and "already exists" in err and "--force" in err
    assert call_main(capsys, *args, "-o", str(out), "--force")[0] == 0
    assert digests(out) == first  # the same inputs give the same bytes
    for target, message in ((folders[0], "is one of the inputs"), (tmp_path, "holds the input")):
        code, _, err = call_main(capsys, *args, "-o", str(target), "--force")
        assert code == 2 and message in err, err
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = call_main(capsys, *args, "-o", str(plain), "--force")
    assert code == 2 and "is a directory" in err
    code, _, err = call_main(capsys, *args, "-o", str(tmp_path / "x"), "--to", "pt")
    assert code == 2 and "--to" in err and "new folder" in err
    assert digests(folders[0]) == before


def test_failed_verification_leaves_no_folder(tmp_path, rng, capsys, monkeypatch):
    folders = [save_dcp(tmp_path / f"dcp_rank{r}", s) for r, s in enumerate(_dcp_states(rng, 2))]

    def broken(written, patches, done):
        raise verification_failed(written, "injected")

    monkeypatch.setattr(folder_writer, "_verify_folder", broken)
    code, _, err = call_main(capsys, "average", *map(str, folders), "-o", str(tmp_path / "out"))
    assert code == 3 and "injected" in err
    assert sorted(os.listdir(tmp_path)) == ["dcp_rank0", "dcp_rank1"]


def test_from_pretrained_loads_the_repaired_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    ranks = []
    for r in range(2):
        torch.manual_seed(r)
        model = transformers.ResNetForImageClassification(config).eval()
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    buf.copy_(torch.rand_like(buf) + (1.0 if name.endswith("var") else r))
        model.save_pretrained(tmp_path / f"rank{r}", max_shard_size="20KB")
        ranks.append({k: v.clone() for k, v in model.state_dict().items()})
    assert len(list((tmp_path / "rank0").glob("*.safetensors"))) > 1
    out = tmp_path / "fixed"
    code, _, err = call_main(
        capsys, "average", str(tmp_path / "rank0"), str(tmp_path / "rank1"), "-o", str(out)
    )
    assert code == 0, err
    fixed = transformers.ResNetForImageClassification.from_pretrained(out).state_dict()
    for key in ranks[0]:
        if key.endswith("running_mean"):
            layer = key[: -len(".running_mean")]
            mean, var = reference_merge(ranks, "", layer, "pooled")
            np.testing.assert_array_equal(fixed[key].numpy(), mean.astype(np.float32))
            np.testing.assert_array_equal(fixed[f"{layer}.running_var"].numpy(), var.astype(np.float32))
        elif not key.endswith("running_var"):
            assert torch.equal(fixed[key], ranks[0][key]), key


def test_rank_stats_averaged_into_the_dcp_folder_they_sit_in(tmp_path, rng, capsys):
    states = rank_states(rng)
    folder = save_dcp(tmp_path / "step_10", {"model": states[0], "step": 10})
    for r, s in enumerate(states):  # what save_rank_stats writes beside dcp.save: the BatchNorm tensors
        save_file(
            {k: v.contiguous() for k, v in s.items() if ".bn." in k}, folder / f"bn_stats_rank{r}.safetensors"
        )
    ranks = str(folder / "bn_stats_rank*.safetensors")
    out = tmp_path / "fixed"
    code, _, err = call_main(capsys, "average", ranks, "--reference", str(folder), "-o", str(out))
    assert code == 0, err
    loaded = _dcp_load(out, {"model": states[0], "step": 10})
    for key, value in expected_stats(states).items():
        np.testing.assert_array_equal(loaded["model"][key].numpy(), value.astype(np.float32))
    assert loaded["step"] == 10
