"""State dicts are found by shape, named by key path, and selected with --key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import assert_same_tensor

from bnaudit.checkpoint import find_state_dicts, load_checkpoint, select_state_dicts
from bnaudit.errors import InputError
from tests.checkpoint.ckpt_helpers import small_bn_model


def _model() -> torch.nn.Module:
    return small_bn_model()


def _optimizer_state(model: torch.nn.Module) -> dict[str, Any]:
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    return opt.state_dict()


def _names(tmp_path: Path, obj: Any) -> list[str]:
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    return [sd.name for sd in load_checkpoint(path).state_dicts]


def test_plain_state_dict_is_the_root(tmp_path: Path) -> None:
    assert _names(tmp_path, _model().state_dict()) == [""]


def test_timm_layout(tmp_path: Path) -> None:
    model = _model()
    ckpt = {
        "epoch": 3,
        "arch": "resnet",
        "state_dict": model.state_dict(),
        "optimizer": _optimizer_state(model),
        "state_dict_ema": model.state_dict(),
        "args": argparse.Namespace(lr=0.1, model="resnet"),
        "version": 2,
    }
    assert _names(tmp_path, ckpt) == ["state_dict", "state_dict_ema"]


def test_lightning_layout(tmp_path: Path) -> None:
    model = _model()
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.4",
        "state_dict": sd,
        "optimizer_states": [_optimizer_state(model)],
        "lr_schedulers": [{"last_epoch": 1}],
        "hyper_parameters": {"lr": 0.1, "layers": [1, 2]},
        "loops": {},
        "callbacks": {},
    }
    path = tmp_path / "l.ckpt"
    torch.save(ckpt, path)
    found = load_checkpoint(path).state_dicts
    assert [s.name for s in found] == ["state_dict"]
    assert "model.1.running_mean" in found[0].tensors


def test_torchvision_and_nested_layouts(tmp_path: Path) -> None:
    model = _model()
    ckpt = {
        "model": model.state_dict(),
        "model_ema": {"module": model.state_dict()},
        "optimizer": _optimizer_state(model),
        "lr_scheduler": {"step": 1},
        "args": argparse.Namespace(),
        "epoch": 9,
        "ranks": [model.state_dict(), model.state_dict()],
    }
    assert _names(tmp_path, ckpt) == ["model", "model_ema/module", "ranks/0", "ranks/1"]


def test_bare_optimizer_state_is_not_a_state_dict(tmp_path: Path) -> None:
    assert _names(tmp_path, {"opt": _optimizer_state(_model())}) == []


def test_extra_state_and_none_values_allowed(tmp_path: Path) -> None:
    sd = dict(_model().state_dict())
    sd["head._extra_state"] = {"anything": 1}
    sd["missing"] = None
    assert _names(tmp_path, {"state_dict": sd}) == ["state_dict"]


def test_depth_is_bounded(tmp_path: Path) -> None:
    sd = _model().state_dict()
    assert _names(tmp_path, {"a": {"b": {"c": {"d": sd}}}}) == ["a/b/c/d"]
    assert _names(tmp_path, {"a": {"b": {"c": {"d": {"e": sd}}}}}) == []


def test_whole_pickled_module_is_flattened(tmp_path: Path) -> None:
    model = _model()
    model.register_buffer("scratch", torch.ones(1), persistent=False)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "epoch": 1}, path)
    found = load_checkpoint(path).state_dicts
    assert [s.name for s in found] == ["model"]
    expected = model.state_dict()
    assert list(found[0].tensors) == list(expected)
    for key, t in expected.items():
        assert_same_tensor(found[0].tensors[key], t, key)


def test_whole_module_at_root(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    found = load_checkpoint(path).state_dicts
    assert [s.name for s in found] == [""] and list(found[0].tensors) == list(model.state_dict())


def test_select_by_key(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "c.pt"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": model.state_dict()}, path)
    found = load_checkpoint(path).state_dicts
    assert select_state_dicts(found, None) == found
    assert [s.name for s in select_state_dicts(found, "state_dict_ema")] == ["state_dict_ema"]
    with pytest.raises(InputError) as err:
        select_state_dicts(found, "ema", source=str(path))
    message = str(err.value)
    assert "'state_dict', 'state_dict_ema'" in message and "--key" in message and str(path) in message
    assert "\n" not in message


def test_find_state_dicts_on_plain_objects() -> None:
    assert find_state_dicts({"a": 1, "b": [1, 2]}) == []
    assert find_state_dicts([]) == []
