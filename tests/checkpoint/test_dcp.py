"""torch.distributed.checkpoint folders: read inertly, tensors lazy, payloads flagged, never executed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint import tensors as tensors_module
from bnaudit.checkpoint.dcp_metadata import unflatten
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import ChunkedTensor, StorageRef, TensorRef
from bnaudit.errors import InputError
from tests.conftest import REPO, bn_state, call_main


def save_dcp(folder: Path, state: dict[str, Any]) -> Path:
    """Save ``state`` with the real torch.distributed.checkpoint.save in this (non-distributed) process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    return folder


class Touch:
    """Pickles as ``os.system("touch MARKER")``: unpickling it with pickle or torch.load creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def model_sd(rng: np.random.Generator) -> OrderedDict[str, torch.Tensor]:
    return bn_state({"layer1": 4, "layer2": 3}, rng)


def test_reads_real_dcp_lazily_with_the_saved_layout(tmp_path: Path, model_sd: OrderedDict) -> None:
    folder = save_dcp(tmp_path / "ckpt", {"model": model_sd, "epoch": 3, "extra": {"lr": 0.1}})
    ckpt = load_checkpoint(folder)
    assert ckpt.format == "dcp"
    assert [sd.name for sd in ckpt.state_dicts] == ["model"]
    assert ckpt.root["epoch"] == 3 and ckpt.root["extra"] == {"lr": 0.1}
    sd = ckpt.state_dict("model")
    assert list(sd.tensors) == list(model_sd)
    for key, tensor in model_sd.items():
        got = read_tensor(sd.tensors[key])
        np.testing.assert_array_equal(got, tensor.numpy(), err_msg=key)
        assert got.dtype == tensor.numpy().dtype
    assert any(
        g.source == ".metadata" and g.qualname.endswith("checkpoint.metadata.Metadata") for g in ckpt.globals
    )


def test_flat_state_dict_and_bfloat16(tmp_path: Path) -> None:
    sd = {"bn.running_mean": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "bn.running_var": torch.ones(2)}
    ckpt = load_checkpoint(save_dcp(tmp_path / "flat", sd))
    assert [s.name for s in ckpt.state_dicts] == [""]
    np.testing.assert_array_equal(read_tensor(ckpt.state_dicts[0].tensors["bn.running_mean"]), [1.5, -2.0])


def test_no_tensor_data_is_read_when_loading(tmp_path: Path, model_sd: OrderedDict, monkeypatch) -> None:
    folder = save_dcp(tmp_path / "ckpt", {"model": model_sd})

    def refuse(*args: object) -> bytes:
        raise AssertionError("tensor data read while only opening the checkpoint")

    monkeypatch.setattr(tensors_module, "_read_plain", refuse)
    ckpt = load_checkpoint(folder)
    with pytest.raises(AssertionError):
        read_tensor(ckpt.state_dict("model").tensors["layer1.bn.running_mean"])


def test_unflatten_without_planner_data_splits_known_top_keys_only() -> None:
    flat = {"model.layer1.bn.running_mean": 1, "epoch": 2, "layer2.bn.running_var": 3}
    root = unflatten(flat, None, [], Path("x"))
    assert root == {"model": {"layer1.bn.running_mean": 1}, "epoch": 2, "layer2.bn.running_var": 3}


def test_unflatten_keeps_clashing_paths_at_the_top() -> None:
    notes: list[str] = []
    root = unflatten({"a": 1, "a.b": 2}, {"a": ("a",), "a.b": ("a", "b")}, notes, Path("x"))
    assert root == {"a": 1, "a.b": 2} and notes


def test_cli_inspect_and_compare_dcp_folders(capsys, tmp_path: Path, rng: np.random.Generator) -> None:
    close = [bn_state({"layer1": 4}, np.random.default_rng(7)) for _ in range(2)]
    far = bn_state({"layer1": 4}, np.random.default_rng(7), shift=5.0)
    for name, sd in (("ok_rank0", close[0]), ("ok_rank1", close[1]), ("far_rank1", far)):
        save_dcp(tmp_path / name, {"model": sd, "step": 10})
    code, out, err = call_main(capsys, "inspect", str(tmp_path / "ok_rank0"))
    assert code == 0, err
    assert "layer1.bn" in out and "unsafe-pickle" not in out
    code, out, err = call_main(capsys, "compare", str(tmp_path / "ok_rank0"), str(tmp_path / "ok_rank1"))
    assert code == 0, err
    code, out, err = call_main(capsys, "compare", str(tmp_path / "ok_rank0"), str(tmp_path / "far_rank1"))
    assert code == 1 and "divergence" in out, (out, err)


def _assert_flagged(capsys, marker: Path, *args: str, global_name: str = "system") -> None:
    code, out, err = call_main(capsys, *args)
    assert code == 1, (out, err)
    assert "unsafe-pickle" in out and global_name in out
    assert "Traceback" not in err
    assert not marker.exists()


def test_payload_in_metadata_is_flagged_never_run(capsys, tmp_path: Path, model_sd: OrderedDict) -> None:
    folders = [save_dcp(tmp_path / f"ckpt_rank{r}", {"model": model_sd}) for r in range(2)]
    marker = tmp_path / "pwned"
    for folder in folders:
        # A realistic attack: DCP metadata that still loads, with a payload riding along in one field.
        meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
        meta.storage_meta = Touch(marker)
        (folder / ".metadata").write_bytes(pickle.dumps(meta))
    pickle.loads((folders[0] / ".metadata").read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    _assert_flagged(capsys, marker, "inspect", str(folders[0]))
    _assert_flagged(capsys, marker, "inspect", "--security", str(folders[0]))
    _assert_flagged(capsys, marker, "compare", *map(str, folders))


def test_metadata_replaced_by_a_payload(capsys, tmp_path: Path, model_sd: OrderedDict) -> None:
    folder = save_dcp(tmp_path / "ckpt", {"model": model_sd})
    marker = tmp_path / "pwned"
    # Hand-written protocol-0 pickle: GLOBAL os.system, REDUCE with one string argument.
    (folder / ".metadata").write_bytes(b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    _assert_flagged(capsys, marker, "inspect", str(folder), global_name="os.system")


def test_payload_in_a_non_tensor_item(capsys, tmp_path: Path, model_sd: OrderedDict) -> None:
    marker = tmp_path / "pwned"
    # DCP torch.saves non-tensor values at save time and torch.load(weights_only=False)s them on load.
    folder = save_dcp(tmp_path / "ckpt", {"model": model_sd, "extra": Touch(marker)})
    assert not marker.exists()
    _assert_flagged(capsys, marker, "inspect", str(folder))


def _chunked_dcp(tmp_path: Path, chunks: list[tuple[int, int]]) -> Path:
    """A DCP folder whose layer1.bn.running_mean is stored as raw chunks (offset, size) of ``values``."""
    values = np.arange(4, dtype=np.float32) + 0.5
    folder = save_dcp(tmp_path / "ckpt", {"model": bn_state({"layer1": 4}, np.random.default_rng(0))})
    meta = pickle.loads((folder / ".metadata").read_bytes())
    fqn = "model.layer1.bn.running_mean"
    meta.state_dict_metadata[fqn].chunks = [
        ChunkStorageMetadata(torch.Size([o]), torch.Size([n])) for o, n in chunks
    ]
    meta.storage_data = {k: v for k, v in meta.storage_data.items() if k.fqn != fqn}
    blob = b""
    for o, n in chunks:
        meta.storage_data[MetadataIndex(fqn, [o])] = _StorageInfo("__1_0.distcp", len(blob), 4 * n)
        blob += values[o : o + n].tobytes()
    (folder / "__1_0.distcp").write_bytes(blob)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def test_sharded_tensor_is_assembled_from_raw_chunks(tmp_path: Path) -> None:
    ckpt = load_checkpoint(_chunked_dcp(tmp_path, [(0, 3), (3, 1)]))
    ref = ckpt.state_dict("model").tensors["layer1.bn.running_mean"]
    assert isinstance(ref.location, ChunkedTensor)
    np.testing.assert_array_equal(read_tensor(ref), np.arange(4) + 0.5)


def test_sharded_tensor_with_a_gap_is_refused(capsys, tmp_path: Path) -> None:
    folder = _chunked_dcp(tmp_path, [(0, 2), (3, 1)])
    code, _, err = call_main(capsys, "inspect", str(folder))
    assert code == 2 and "exactly once" in err and "Traceback" not in err


def test_chunked_ref_places_chunks(tmp_path: Path) -> None:
    path = tmp_path / "raw"
    path.write_bytes(np.arange(6, dtype="<f8").tobytes())
    parts = tuple(
        ((o,), TensorRef(StorageRef(path, str(o), 8 * o, 8 * n, "float64"), "float64", (n,), (1,)))
        for o, n in ((4, 2), (0, 4))
    )
    chunked = ChunkedTensor(StorageRef(path, "w", 0, 0, "float64"), parts, "w")
    whole = TensorRef(chunked, "float64", (6,), (1,))
    np.testing.assert_array_equal(read_tensor(whole), np.arange(6.0))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: (f / "__0_0.distcp").unlink(), "missing"),
        (lambda f: (f / "__0_0.distcp").write_bytes((f / "__0_0.distcp").read_bytes()[:3000]), "truncated"),
        (lambda f: (f / ".metadata").write_bytes(pickle.dumps({"not": "metadata"})), "Metadata"),
        (lambda f: (f / ".metadata").write_bytes(b""), ".metadata"),
    ],
)
def test_broken_dcp_is_one_line_exit_2(
    capsys, tmp_path: Path, model_sd: OrderedDict, damage, fragment
) -> None:
    folder = save_dcp(tmp_path / "ckpt", {"model": model_sd})
    damage(folder)
    code, out, err = call_main(capsys, "inspect", str(folder))
    assert code == 2, (out, err)
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_data_file_outside_the_folder_is_refused(tmp_path: Path, model_sd: OrderedDict) -> None:
    folder = save_dcp(tmp_path / "ckpt", {"model": model_sd})
    meta = pickle.loads((folder / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(InputError, match="not a file inside the folder"):
        load_checkpoint(folder)


_TWO_RANKS = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
dist.init_process_group("gloo")
r = dist.get_rank()
sd = {"bn.running_mean": torch.full((3,), float(r + 1)), "bn.running_var": torch.full((3,), float(r + 2))}
dcp.save({"model": sd}, checkpoint_id=sys.argv[1])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_rank_gloo_save_keeps_one_copy_of_replicated_stats(tmp_path: Path) -> None:
    script = tmp_path / "save.py"
    script.write_text(_TWO_RANKS)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29547",
    ]
    proc = subprocess.run(
        [*torchrun, str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sd = load_checkpoint(tmp_path / "out").state_dict("model")
    mean = read_tensor(sd.tensors["bn.running_mean"])
    # Deduplication: each rank saved its own values, one rank's copy survives.
    assert mean.tolist() in ([1.0] * 3, [2.0] * 3)
    assert not isinstance(sd.tensors["bn.running_mean"].location, ChunkedTensor)
