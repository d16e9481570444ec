"""NumPy arrays in a pickle (detectron2's ``pickle.dump`` of ``{'model': {name: ndarray}}``) read as tensors.

Every file is written by ``pickle.dump`` of real arrays; the expected values are the arrays themselves.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnaudit.bn.pickle_policy import Safety, classify_global, pickle_findings
from bnaudit.checkpoint import TensorRef, load_checkpoint, read_tensor, read_tensors
from bnaudit.report.model import Severity
from tests.conftest import call_main

PROTOCOLS = [2, 4, 5]  # 2: bytes via _codecs.encode; 4: raw bytes in frames; 5: _frombuffer of a bytearray


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 4))
    return {
        "f16": base.astype(np.float16),
        "f32": base.astype(np.float32),
        "f64": base,
        "fortran": np.asfortranarray(base.astype(np.float32)),
        "i64": np.arange(-6, 6, dtype=np.int64),
        "i32": np.array([1, -2, 3], dtype=np.int32),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(7, dtype=np.int64),  # a 0-d array, as tensor.numpy() gives num_batches_tracked
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _detectron2_model(shift: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "backbone.conv1.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "backbone.conv1.norm.weight": np.ones(4, np.float32),
        "backbone.conv1.norm.bias": np.zeros(4, np.float32),
        "backbone.conv1.norm.running_mean": (rng.normal(size=4) + shift).astype(np.float32),
        "backbone.conv1.norm.running_var": rng.uniform(0.5, 2.0, size=4).astype(np.float32),
    }


def _dump(path: Path, obj: Any, protocol: int) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_arrays_read_as_the_arrays(tmp_path: Path, protocol: int) -> None:
    arrays = _arrays()
    ckpt = load_checkpoint(_dump(tmp_path / "a.pkl", {"model": arrays}, protocol))
    assert ckpt.format == "pickle" and ckpt.warnings == []
    refs = ckpt.root["model"]
    assert all(isinstance(ref, TensorRef) for ref in refs.values())
    got = read_tensors(list(refs.values()))
    for (name, want), ref, one_by_one in zip(arrays.items(), refs.values(), got, strict=True):
        assert ref.shape == want.shape, name
        assert ref.stride == tuple(s // want.itemsize for s in want.strides) or want.size == 0, name
        for array in (read_tensor(ref), one_by_one):
            assert array.dtype == want.dtype, name
            np.testing.assert_array_equal(array, want, err_msg=name)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_detectron2_pickle_has_its_batchnorm_layer(
    tmp_path: Path, protocol: int, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _detectron2_model(0.0)
    path = _dump(
        tmp_path / "model_final.pkl", {"model": model, "__author__": "Detectron2 Model Zoo"}, protocol
    )
    code, out, err = call_main(capsys, "inspect", str(path), "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    (layer,) = report["layers"]
    assert layer["name"] == "backbone.conv1.norm" and layer["state_dict"] == "model"
    want = model["backbone.conv1.norm.running_var"].astype(np.float64)
    assert layer["metrics"]["var_min"] == pytest.approx(want.min(), rel=1e-6)
    assert layer["metrics"]["mean_abs_max"] == pytest.approx(
        np.abs(model["backbone.conv1.norm.running_mean"].astype(np.float64)).max(), rel=1e-6
    )
    # NumPy's reconstruction globals are known data: notes, never a warning or an error.
    ckpt = load_checkpoint(path)
    assert {classify_global(g.module, g.name) for g in ckpt.globals} <= {Safety.SAFE, Safety.BENIGN}
    assert all(f.severity is Severity.INFO for f in pickle_findings(ckpt.globals, str(path)))


def test_compare_of_detectron2_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [
        str(_dump(tmp_path / f"model_rank{r}.pkl", {"model": _detectron2_model(3.0 * r)}, 4))
        for r in range(2)
    ]
    code, out, err = call_main(capsys, "compare", *paths, "--format", "json")
    assert code == 1, err  # a mean shift of 3 (std about 1) is a divergence
    kinds = {f["kind"] for f in json.loads(out)["findings"] if f["severity"] == "error"}
    assert kinds == {"divergence"}
    (tmp_path / "same").mkdir()
    twins = [
        str(_dump(tmp_path / "same" / f"model_rank{r}.pkl", {"model": _detectron2_model(0.0)}, 5))
        for r in range(2)
    ]
    code, out, err = call_main(capsys, "compare", *twins, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["layers"][0]["name"] == "backbone.conv1.norm"


def test_average_refuses_to_write_a_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [
        str(_dump(tmp_path / f"model_rank{r}.pkl", {"model": _detectron2_model(r)}, 4)) for r in range(2)
    ]
    out = tmp_path / "avg.pkl"
    code, stdout, err = call_main(capsys, "average", *paths, "-o", str(out))
    assert code == 2 and stdout == "" and not out.exists()
    assert "is a pickle checkpoint, which bnaudit cannot write" in err and "--reference" in err


def test_unreadable_arrays_stay_placeholders(tmp_path: Path) -> None:
    arrays = {
        "objects": np.array([1, "a", None], dtype=object),
        "big_endian": np.arange(3, dtype=">f4"),
        "record": np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")]),
        "fine": np.arange(3, dtype=np.float32),
    }
    ckpt = load_checkpoint(_dump(tmp_path / "odd.pkl", arrays, 4))
    root = ckpt.root
    assert isinstance(root["fine"], TensorRef)
    np.testing.assert_array_equal(read_tensor(root["fine"]), arrays["fine"])
    assert not any(isinstance(root[k], TensorRef) for k in ("objects", "big_endian", "record"))
    assert any("NumPy array of an object, structured or big-endian dtype" in w for w in ckpt.warnings)


def test_shared_array_is_one_tensor(tmp_path: Path) -> None:
    # The memo makes both keys one object; both must become the tensor, including inside a tuple.
    array = np.arange(4, dtype=np.float32)
    ckpt = load_checkpoint(_dump(tmp_path / "shared.pkl", {"a": array, "b": array, "t": (array, 1)}, 2))
    a, b, (t, one) = ckpt.root["a"], ckpt.root["b"], ckpt.root["t"]
    assert isinstance(a, TensorRef) and a is b and t is a and one == 1
