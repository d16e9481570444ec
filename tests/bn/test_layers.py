"""Layer discovery and key normalisation."""

from __future__ import annotations

import pytest

from bnaudit.bn.layers import find_bn_layers, is_ignored, normalize_key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("module.layer1.bn.running_mean", "layer1.bn.running_mean"),
        ("_orig_mod.module.bn.weight", "bn.weight"),
        ("module._orig_mod.module.bn.weight", "bn.weight"),
        ("model.bn.weight", "model.bn.weight"),
        ("layer.module.x", "layer.module.x"),
        ("module.", "module."),
    ],
)
def test_normalize_key(key, expected):
    assert normalize_key(key) == expected


def test_find_layers_with_optional_parts_and_order():
    keys = [
        "module.conv.weight",
        "module.bn1.weight",
        "module.bn1.bias",
        "module.bn1.running_mean",
        "module.bn1.running_var",
        "module.bn1.num_batches_tracked",
        "frozen.running_mean",
        "frozen.running_var",
        "frozen.weight",
        "frozen.bias",
        "qat.bn.running_mean",
        "qat.bn.running_var",
        "half.running_mean",  # no running_var: not a layer
        "running_mean",
        "running_var",
    ]
    layers = find_bn_layers(keys)
    assert [x.name for x in layers] == ["bn1", "frozen", "qat.bn", ""]
    bn1 = layers[0]
    assert bn1.running_mean == "module.bn1.running_mean"
    assert bn1.num_batches_tracked == "module.bn1.num_batches_tracked"
    assert layers[1].num_batches_tracked is None and layers[1].weight == "frozen.weight"
    assert layers[2].weight is None and layers[2].bias is None
    assert layers[3].display_name == "<root>"


def test_wrapped_lone_batchnorm_is_named_root():
    (layer,) = find_bn_layers(["module.running_mean", "module.running_var"])
    assert layer.name == ""


def test_ignore_globs():
    assert is_ignored("head.bn", ["head.*"])
    assert not is_ignored("layer1.bn", ["head.*", "layer2*"])
