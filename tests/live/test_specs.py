"""--model / --data / --forward specs, key=value arguments, tensor files and batch input extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnaudit.errors import InputError, UsageError
from bnaudit.live.batch_source import batch_input, build_batches
from bnaudit.live.specs import build_model, load_callable, parse_kv

HELPERS = Path(__file__).resolve().parents[1] / "recal_helpers"


def test_load_callable_module_and_file_and_dotted() -> None:
    assert load_callable("tests.recal_helpers.userfile:make", "--model")(3)[0].num_features == 3
    assert callable(load_callable(f"{HELPERS / 'userfile.py'}:make", "--model"))
    assert isinstance(
        load_callable(f"{HELPERS / 'userfile.py'}:Factory.build", "--model")(), torch.nn.BatchNorm2d
    )


def test_load_callable_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"must look like 'package.module:callable'") as no_colon:
        load_callable("nocolon", "--model")
    assert no_colon.value.fields.where == "--model spec 'nocolon'"
    with pytest.raises(InputError, match="no module named 'no_such_pkg_xyz'"):
        load_callable("no_such_pkg_xyz.mod:fn", "--model")
    with pytest.raises(InputError, match=r"file 'missing.py' does not exist"):
        load_callable("missing.py:fn", "--data")
    with pytest.raises(InputError, match="has no attribute 'nope'"):
        load_callable("tests.recal_helpers.userfile:nope", "--model")
    with pytest.raises(InputError, match="'NOT_CALLABLE' is a int, not a callable"):
        load_callable("tests.recal_helpers.userfile:NOT_CALLABLE", "--model")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nraise KeyError('boom')\n")
    with pytest.raises(InputError) as info:
        load_callable(f"{bad}:fn", "--forward")
    assert str(info.value) == f"--forward spec '{bad}:fn': importing '{bad}' raised KeyError: 'boom'"


def test_parse_kv() -> None:
    got = parse_kv(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=resnet18", "f=", "g=null", "a=2"], "--model-arg")
    assert got == {"a": 2, "b": 0.5, "c": True, "d": [1, 2], "e": "resnet18", "f": "", "g": None}
    with pytest.raises(UsageError) as info:
        parse_kv(["x"], "--data-arg")
    assert (
        info.value.fields.where == "--data-arg 'x'"
        and info.value.fields.problem == "must look like key=value"
    )
    with pytest.raises(UsageError, match="not a valid keyword"):
        parse_kv(["a-b=1"], "--data-arg")


def test_build_model() -> None:
    model = build_model("tests.recal_helpers.userfile:make", {"channels": 4})
    assert model[0].num_features == 4
    with pytest.raises(InputError, match=r"returned a str, expected a torch.nn.Module"):
        build_model("tests.recal_helpers.userfile:not_a_module")
    with pytest.raises(UsageError, match="calling it raised TypeError"):
        build_model("tests.recal_helpers.userfile:make", {"wrong": 1})


def test_build_batches_callable_and_self_sharding() -> None:
    src = build_batches("tests.recal_helpers.userfile:loader", {}, batch_size=3)
    assert not src.sharded and len(list(src.batches)) == 6 and src.batches[0].shape == (3, 2)
    src = build_batches("tests.recal_helpers.userfile:loader", {}, rank=1, world_size=2)
    assert src.sharded and [float(b[0, 0]) for b in src.batches] == [1.0, 3.0, 5.0]
    with pytest.raises(InputError, match="expected an iterable of batches"):
        build_batches("tests.recal_helpers.userfile:not_a_module", {})


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors", ".pt-dict"])
def test_tensor_files_batched_in_order(tmp_path: Path, suffix: str) -> None:
    data = torch.arange(14.0).reshape(7, 2)
    path = tmp_path / ("x" + suffix.removesuffix("-dict"))
    if suffix == ".npy":
        np.save(path, data.numpy())
    elif suffix == ".safetensors":
        save_file({"inputs": data, "labels": torch.zeros(7)}, str(path))
    elif suffix == ".pt-dict":
        torch.save({"only": data}, path)
    else:
        torch.save(data, path)
    src = build_batches(str(path), None, batch_size=3)
    batches = list(src.batches)
    assert [len(b) for b in batches] == [3, 3, 1] and torch.equal(torch.cat(batches), data)


def test_tensor_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, path)
    with pytest.raises(UsageError, match="give --batch-size"):
        build_batches(str(path), None)
    with pytest.raises(InputError, match="holds several tensors"):
        build_batches(str(path), None, batch_size=2)
    with pytest.raises(InputError, match="does not exist"):
        build_batches(str(tmp_path / "none.npy"), None, batch_size=2)
    with pytest.raises(UsageError, match="takes no --data-arg") as info:
        build_batches(str(path), {"a": 1}, batch_size=2)
    assert info.value.fields.where == f"--data '{path}'" and info.value.fields.fix == "drop --data-arg"


def test_batch_input() -> None:
    x = torch.zeros(2)
    assert batch_input(x) is x
    assert batch_input((1, x), input_index=1) is x
    assert batch_input({"img": x}, input_key="img") is x
    with pytest.raises(
        UsageError, match=r"batches are dicts \(keys: img, y\); name the input with --input-key"
    ):
        batch_input({"img": x, "y": 1})
    with pytest.raises(UsageError) as index_error:
        batch_input([x], input_index=3)
    assert index_error.value.fields.where == "--input-index 3"
    assert index_error.value.fields.problem == "is out of range for batches of 1 items"
    with pytest.raises(UsageError, match="--forward") as type_error:
        batch_input("text")
    assert type_error.value.fields.fix == "name a callable(model, batch) with --forward for anything else"
