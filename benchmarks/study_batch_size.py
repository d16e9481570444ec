"""Held-out accuracy after recalibration against the calibration batch size, per method (issue 18).

Two trained models: the fixtures' digits CNN (``fixtures/ddp_nosync_sorted/ckpt_rank0.pt``) and a small
ResNet of ``benchmarks/archs.py`` trained here on the digits training split (channels repeated to 3, a few
epochs, seeded). Each starts from its trained weights with its running statistics reset (mean 0, var 1),
is recalibrated on the digits calibration split in batches of 2, 4, 8, 16 and 64 by

- ``population``: bnaudit's default (exact statistics of the train-mode forward's inputs);
- ``sequential``: bnaudit ``--mode sequential`` (each layer on the inputs eval mode feeds it);
- ``update_bn``: ``torch.optim.swa_utils.update_bn``;
- ``batch-mean``: bnaudit ``--method batch-mean`` (fvcore-style: the average of per-batch statistics);

and scored on the held-out split in eval mode. The oracle row is bnaudit's population statistics of the
whole calibration split as one batch (what every train-mode method tends to as the batch grows).

Usage:
    python benchmarks/study_batch_size.py           # writes benchmarks/results/batch_size_study.json
    python benchmarks/study_batch_size.py --smoke   # tiny (CI): two batch sizes, one training epoch
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.archs import ResNet  # noqa: E402
from bnaudit.live.options import RecalibrationOptions  # noqa: E402
from bnaudit.live.recalibrate import recalibrate  # noqa: E402
from fixtures.digits import build_model, load_split  # noqa: E402

METHODS = ("population", "sequential", "update_bn", "batch-mean")


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1)


def _digits_cnn() -> tuple[nn.Module, Any]:
    model = build_model()
    ckpt = torch.load(ROOT / "fixtures/ddp_nosync_sorted/ckpt_rank0.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    return model, lambda x: x


def _resnet(epochs: int) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = ResNet(width=8, blocks=1)
    x, y = load_split("train")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(_rgb(x), y), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model, _rgb


def _reset(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return model


def _accuracy(model: nn.Module, prep: Any) -> float:
    x, y = load_split("heldout")
    model.eval()
    with torch.no_grad():
        return float((model(prep(x)).argmax(1) == y).double().mean())


def _recalibrated(model: nn.Module, method: str, batches: list[torch.Tensor]) -> nn.Module:
    model = _reset(model)
    if method == "update_bn":
        update_bn(batches, model)
        return model
    options = {
        "population": RecalibrationOptions(),
        "sequential": RecalibrationOptions(mode="sequential"),
        "batch-mean": RecalibrationOptions(method="batch-mean"),
    }[method]
    recalibrate(model, batches, options)
    return model


def study(sizes: list[int], epochs: int) -> dict[str, Any]:
    calib, _ = load_split("calib")
    out: dict[str, Any] = {"batch_sizes": sizes, "calibration_samples": len(calib), "models": {}}
    for name, (model, prep) in (("digits CNN (fixtures)", _digits_cnn()), ("small ResNet", _resnet(epochs))):
        data = prep(calib)
        rows: dict[str, list[float]] = {m: [] for m in METHODS}
        for size in sizes:
            batches = list(data.split(size))
            for method in METHODS:
                rows[method].append(_accuracy(_recalibrated(model, method, batches), prep))
        oracle = _accuracy(_recalibrated(model, "population", [data]), prep)
        out["models"][name] = {"accuracy": rows, "oracle": oracle, "trained": _accuracy(model, prep)}
        print(name, json.dumps(out["models"][name]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two batch sizes, one epoch (for CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_size_study.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.smoke:
        result = study([4, 64], epochs=1)
        print("study smoke: ok")
        return
    result = study([2, 4, 8, 16, 64], epochs=8)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
