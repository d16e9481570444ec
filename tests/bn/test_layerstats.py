"""Reading BatchNorm layers: values in float64 and the digest of the statistics' stored bytes, in one read."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnaudit.bn.layers import find_bn_layers
from bnaudit.bn.layerstats import read_layers, read_layers_with_digest
from bnaudit.checkpoint import load_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_digest_is_the_stored_bytes_of_mean_then_var(tmp_path, dtype, container):
    generator = torch.Generator().manual_seed(3)
    state = {}
    for name, channels in (("a", 5), ("b", 3)):
        state[f"{name}.running_mean"] = torch.randn(channels, generator=generator).to(dtype)
        state[f"{name}.running_var"] = (torch.rand(channels, generator=generator) + 0.5).to(dtype)
        state[f"{name}.weight"] = torch.ones(channels)
    path = tmp_path / f"m.{container}"
    if container == "pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    sd = load_checkpoint(path).state_dicts[0]
    layers = [(sd, bn) for bn in find_bn_layers(sd.tensors)]
    stats, digest = read_layers_with_digest(layers, str(path))
    # Independently: torch's own bytes of each tensor (bf16 through its 16-bit pattern), little-endian.
    expected = hashlib.sha256()
    for name in ("a", "b"):
        for leaf in ("running_mean", "running_var"):
            tensor = state[f"{name}.{leaf}"]
            raw = tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor
            expected.update(raw.numpy().astype(raw.numpy().dtype.newbyteorder("<")).tobytes())
    assert digest == expected.hexdigest()
    plain = read_layers(layers, str(path))
    for got, same, name in zip(stats, plain, ("a", "b"), strict=True):
        np.testing.assert_array_equal(got.mean, state[f"{name}.running_mean"].double().numpy())
        np.testing.assert_array_equal(got.var, same.var)
