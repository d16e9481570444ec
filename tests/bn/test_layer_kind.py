"""The input kind of a BatchNorm layer is read from the weight that feeds it, in torch and safetensors files."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnaudit.bn.layer_kind import InputKind, input_kinds
from bnaudit.bn.layers import find_bn_layers
from bnaudit.checkpoint import load_checkpoint


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, bias=False), bn=nn.BatchNorm2d(8))),
            up=nn.ConvTranspose2d(8, 6, 2),
            up_bn=nn.BatchNorm2d(6),
            seq=nn.Conv1d(6, 5, 3),  # BatchNorm1d over N x C x L: spatial
            seq_bn=nn.BatchNorm1d(5),
            fc=nn.Linear(5, 8, bias=False),  # 8 outputs, like stem.conv: the module path decides
            fc_bn=nn.BatchNorm1d(8),
            lone_bn=nn.BatchNorm1d(7),  # nothing produces 7 channels
        )
    )


def _expected(model: nn.Module) -> dict[str, InputKind]:
    # From the module graph itself: what feeds each BatchNorm in this model.
    return {
        "stem.bn": InputKind.SPATIAL,
        "up_bn": InputKind.SPATIAL,
        "seq_bn": InputKind.SPATIAL,
        "fc_bn": InputKind.FLAT,
        "lone_bn": InputKind.UNKNOWN,
    }


@pytest.mark.parametrize("container", ["torch", "safetensors"])
def test_kinds_follow_the_feeding_weight(tmp_path, container):
    model = _model()
    path = tmp_path / f"m.{'pt' if container == 'torch' else 'safetensors'}"
    if container == "torch":
        torch.save(model.state_dict(), path)
    else:  # safetensors sorts its keys by name: file order no longer follows the forward
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sd = load_checkpoint(path).state_dicts[0]
    assert input_kinds(sd.tensors, find_bn_layers(sd.tensors)) == _expected(model)
