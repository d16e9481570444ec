"""Loading lazy checkpoint tensors into a model: prefix matching, dtype casts, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bnaudit.checkpoint.types import StateDictRef, StorageRef, TensorRef
from bnaudit.errors import ModelMismatchError
from bnaudit.live.modelload import candidate_prefixes, load_state_dict_into, match_prefix
from tests.recal_helpers.models import make_convnet

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.float64: "float64"}


def state_dict_ref(
    sd: dict[str, torch.Tensor], folder: Path, prefix: str = "", bf16: bool = False
) -> StateDictRef:
    """Write each tensor raw into one .bin file and describe it with TensorRefs (as the reader would)."""
    path = folder / "raw.bin"
    refs, offset = {}, 0
    with open(path, "wb") as f:
        for key, t in sd.items():
            t = t.detach().contiguous()
            if bf16 and t.is_floating_point():
                raw, dtype = t.to(torch.bfloat16).view(torch.int16).numpy().tobytes(), "bfloat16"
            else:
                raw, dtype = t.numpy().tobytes(), DTYPES[t.dtype]
            f.write(raw)
            stride = tuple(t.stride()) if t.dim() else ()
            storage = StorageRef(path, key, offset, len(raw), dtype)
            refs[prefix + key] = TensorRef(storage, dtype, tuple(t.shape), stride)
            offset += len(raw)
    return StateDictRef("model", ("model",), refs)


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def trained_state() -> dict[str, torch.Tensor]:
    source = make_convnet(seed=5)
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
        source.bn1.num_batches_tracked.fill_(7)
    return source.state_dict()


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "model."])
def test_loads_under_any_wrapper_prefix(tmp_path: Path, prefix: str) -> None:
    expected = trained_state()
    ref = state_dict_ref(expected, tmp_path, prefix)
    ref.tensors["extra.optimizer_thing"] = ref.tensors[prefix + "fc.bias"]
    model = make_convnet(seed=0)
    result = load_state_dict_into(model, ref)
    assert result.prefix == prefix and result.loaded == len(expected) and not result.casts
    assert result.unused_keys == ("extra.optimizer_thing",)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert model.bn1.num_batches_tracked.dtype == torch.int64


def test_torch_save_file_through_the_zip_reader(tmp_path: Path) -> None:
    checkpoint = pytest.importorskip("bnaudit.checkpoint")
    if not hasattr(checkpoint, "load_checkpoint"):
        pytest.skip("the checkpoint reader is not there yet")
    expected = trained_state()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"model." + k: v for k, v in expected.items()}, "epoch": 3}, path)
    ckpt = checkpoint.load_checkpoint(path)
    sd = next(s for s in ckpt.state_dicts if s.tensors)
    model = make_convnet(seed=0)
    assert load_state_dict_into(model, sd).prefix == "model."
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_bf16_and_half_checkpoints_cast_to_model_dtype(tmp_path: Path) -> None:
    expected = trained_state()
    model = make_convnet(seed=0)
    result = load_state_dict_into(model, state_dict_ref(expected, tmp_path, bf16=True))
    assert ("bn1.running_mean", "bfloat16", "float32") in result.casts
    want = expected["bn1.running_mean"].to(torch.bfloat16).float()
    assert torch.equal(model.bn1.running_mean, want)
    half = make_convnet(seed=0).half()
    load_state_dict_into(half, state_dict_ref(expected, tmp_path))
    assert half.fc.weight.dtype == torch.float16
    assert torch.equal(half.fc.weight, expected["fc.weight"].half())


def test_non_persistent_buffers_are_skipped(tmp_path: Path) -> None:
    model = make_convnet(seed=0)
    model.register_buffer("scratch", torch.ones(3), persistent=False)
    load_state_dict_into(model, state_dict_ref(trained_state(), tmp_path))
    assert torch.equal(model.scratch, torch.ones(3))


def test_mismatch_messages(tmp_path: Path) -> None:
    sd = trained_state()
    model_keys = shapes(make_convnet(channels=4).state_dict())
    wrong = shapes(make_convnet(channels=5).state_dict())
    with pytest.raises(ModelMismatchError) as info:
        match_prefix(model_keys, {"module." + k: v for k, v in wrong.items()}, source="ckpt.pt:model")
    text = str(info.value)
    assert info.value.fields.where == "ckpt.pt:model"
    assert info.value.fields.problem.startswith("does not fit the model under prefix 'module.':")
    assert info.value.fields.fix == "check --model / --model-arg, or give --prefix"
    assert "conv1.weight: model [4, 3, 3, 3] vs checkpoint [5, 3, 3, 3]" in text and ", ..." in text
    missing = {k: v for k, v in shapes(sd).items() if not k.startswith("bn3")}
    with pytest.raises(ModelMismatchError, match=r"5 of 21 model keys are missing \(bn3.weight, bn3.bias"):
        match_prefix(model_keys, missing)
    both = {**{"a." + k: v for k, v in model_keys.items()}, **{"b." + k: v for k, v in model_keys.items()}}
    with pytest.raises(
        ModelMismatchError, match=r"several key prefixes \('a.', 'b.'\); choose one with --prefix"
    ):
        match_prefix(model_keys, both)
    with pytest.raises(ModelMismatchError) as several:
        match_prefix(model_keys, both)
    assert several.value.fields.fix == "choose one with --prefix"
    assert match_prefix(model_keys, both, prefix="b.").prefix == "b."
    with pytest.raises(ModelMismatchError, match=r"under --prefix 'c.'"):
        match_prefix(model_keys, both, prefix="c.")


def test_candidate_prefixes_are_generic() -> None:
    model_keys = {"bn.weight": (2,), "bn.bias": (2,)}
    ckpt = {"student.backbone.bn.weight": (2,), "student.backbone.bn.bias": (2,), "x": (1,)}
    assert candidate_prefixes(model_keys, ckpt)[:2] == ["", "student.backbone."]
    assert match_prefix(model_keys, ckpt).unused_keys == ("x",)
    np.testing.assert_equal(len(candidate_prefixes(model_keys, {})), 1)
