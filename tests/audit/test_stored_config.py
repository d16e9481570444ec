"""The synchronisation settings a checkpoint stores are read from the inert pickle and interpreted."""

from __future__ import annotations

import argparse

import pytest
import torch

from bnaudit.audit.stored_config import stored_training
from bnaudit.checkpoint import load_checkpoint


def _timm_args(**flags: object) -> argparse.Namespace:
    base = {
        "model": "resnet50",
        "sync_bn": False,
        "dist_bn": "reduce",
        "no_ddp_bb": False,
        "grad_accum_steps": 1,
    }
    return argparse.Namespace(**{**base, **flags})


def _stored(tmp_path, payload):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"bn.running_mean": torch.zeros(2)}, **payload}, path)
    return stored_training(load_checkpoint(path).root)


@pytest.mark.parametrize(
    ("payload", "synchronised", "words"),
    [
        ({"args": _timm_args(sync_bn=True)}, True, "SyncBatchNorm"),
        ({"args": _timm_args()}, True, "reduced across ranks at each epoch"),
        ({"args": _timm_args(dist_bn="", no_ddp_bb=True)}, False, "timm --no-ddp-bb"),
        ({"args": _timm_args(dist_bn="")}, True, "broadcast rank 0's buffers"),
        ({"args": _timm_args(dist_bn="", no_ddp_bb=True, grad_accum_steps=4)}, False, "accumulation over 4"),
        (
            {"hyper_parameters": {"sync_batchnorm": False, "broadcast_buffers": False}},
            False,
            "broadcast_buffers=False",
        ),
        ({"hyper_parameters": {"trainer": {"sync_batchnorm": True}}}, True, "SyncBatchNorm"),
        ({"config": {"ddp": {"forward_sync_buffers": False}}}, False, "forward_sync_buffers=False"),
        ({"args": {"accumulate_grad_batches": 2}}, None, "do not say"),
    ],
)
def test_settings_are_found_and_interpreted(tmp_path, payload, synchronised, words):
    found = _stored(tmp_path, payload)
    assert found is not None
    assert found.synchronised is synchronised
    assert words in found.meaning
    assert all("=" in e for e in found.evidence)


def test_a_checkpoint_without_settings_says_nothing(tmp_path):
    assert _stored(tmp_path, {"epoch": 3, "args": {"lr": 0.1}}) is None
    assert _stored(tmp_path, {}) is None
    assert stored_training(["not", "a", "dict"]) is None


def test_evidence_names_where_each_flag_sits(tmp_path):
    found = _stored(tmp_path, {"args": _timm_args(dist_bn="", no_ddp_bb=True)})
    assert found is not None
    assert "args.no_ddp_bb=True" in found.evidence and "args.dist_bn=''" in found.evidence
