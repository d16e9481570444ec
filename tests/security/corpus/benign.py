"""Files real libraries write, which a gate must pass without a pickle finding."""

from __future__ import annotations

import argparse
import datetime
import pathlib
from collections import OrderedDict
from pathlib import Path

from tests.security.corpus.carriers import bn_state, checkpoint_object, save_torch
from tests.security.corpus.dcp_helpers import save_dcp
from tests.security.corpus.registry import benign


def _trained_model():  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    return model, optimizer


@benign("torch.save:zip-default")
def _zip(folder: Path, _m: str) -> Path:
    return save_torch(folder / "zip-default.pt")


@benign("torch.save:legacy")
def _legacy(folder: Path, _m: str) -> Path:
    return save_torch(folder / "legacy.pt", _use_new_zipfile_serialization=False)


@benign("torch.save:protocol-4")
def _protocol_4(folder: Path, _m: str) -> Path:
    return save_torch(folder / "protocol-4.pt", pickle_protocol=4)


@benign("torch.save:whole-module")
def _whole_module(folder: Path, _m: str) -> Path:
    import torch

    model, _ = _trained_model()
    path = folder / "whole-module.pt"
    torch.save(model, path)
    return path


@benign("torch.save:model+optimizer")
def _optimizer(folder: Path, _m: str) -> Path:
    model, optimizer = _trained_model()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    return save_torch(folder / "model-optimizer.pt", state)


@benign("timm-style:args-namespace")
def _timm(folder: Path, _m: str) -> Path:
    args = argparse.Namespace(model="resnet18", sync_bn=True, lr=0.1, epochs=90, amp=False)
    state = {"epoch": 89, "arch": "resnet18", "state_dict": bn_state(), "args": args, "version": 2}
    return save_torch(folder / "timm.pth.tar", state)


@benign("numpy-values-in-checkpoint")
def _numpy(folder: Path, _m: str) -> Path:
    import numpy as np

    extra = {"best_acc": np.float64(0.91), "step": np.int64(1200), "class_weights": np.linspace(0, 1, 5)}
    return save_torch(folder / "numpy-values.pt", {**checkpoint_object(), **extra})


@benign("containers:OrderedDict-Size-pathlib-datetime")
def _containers(folder: Path, _m: str) -> Path:
    import torch

    extra = {
        "meta": OrderedDict(
            shape=torch.Size([4, 3, 1, 1]), data_root=pathlib.PurePosixPath("/data/imagenet")
        ),
        "saved_at": datetime.datetime(2024, 5, 1, 12, 30),
        "run_dir": pathlib.Path("runs/exp1"),
    }
    return save_torch(folder / "containers.pt", {**checkpoint_object(), **extra})


@benign("dcp:torch.distributed.checkpoint.save", load="dcp")
def _dcp(folder: Path, _m: str) -> Path:
    return save_dcp(folder / "dcp-benign")


@benign("safetensors:save_file", requires=("safetensors",))
def _safetensors(folder: Path, _m: str) -> Path:
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    save_file(dict(bn_state()), str(path))
    return path


@benign("lightning:Trainer.fit-ckpt", requires=("lightning",))
def _lightning(folder: Path, _m: str) -> Path:
    from tests.security.corpus.lightning_ckpt import fit_and_save

    return fit_and_save(folder / "lightning")
