"""Whole-process time of ``bnaudit recalibrate`` against an ``update_bn`` script, per architecture.

For each model of ``benchmarks/archs.py`` (a plain 6-layer CNN, a torchvision-style ResNet, a
MobileNet/EfficientNet-style model whose layers are a timm-like ``BatchNormAct2d``, a CNN with a heavy
head after its last BatchNorm), in a temporary folder: a checkpoint ``{"model": state_dict}`` with stale
statistics and synthetic 3 x S x S images (``inputs.pt``). Then, as whole processes (start, load, pass,
write a checkpoint), the sides alternating round by round (the machine may be shared: medians of
interleaved rounds):

- ``bnaudit recalibrate`` (population mode, the default) and ``--mode sequential``;
- a script doing the same job with ``torch.optim.swa_utils.update_bn``: ``torch.load``, build the model,
  ``load_state_dict``, ``update_bn`` over a DataLoader of the same tensor and batch size, ``torch.save``.

Usage:
    python benchmarks/bench_architectures.py             # 1,024 images of 32 px, batches of 64, 5 rounds
    python benchmarks/bench_architectures.py --smoke     # tiny, one model, for CI: checks the script runs
Prints the median seconds per side and the ratios to update_bn, per architecture.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, bnaudit_argv, python_env

ARCHS = Path(__file__).resolve().parent / "archs.py"

UPDATE_BN_SCRIPT = """
import sys
import torch
from torch.optim.swa_utils import update_bn

archs, src, out, data, arch, width, batch_size = sys.argv[1:8]
sys.path.insert(0, str(__import__("pathlib").Path(archs).parent))
import archs as zoo

ckpt = torch.load(src, map_location="cpu", weights_only=True)
model = zoo.build(arch, width=int(width))
model.load_state_dict(ckpt["model"])
inputs = torch.load(data, weights_only=True)
update_bn(torch.utils.data.DataLoader(inputs, batch_size=int(batch_size)), model)
ckpt["model"] = model.state_dict()
torch.save(ckpt, out)
"""

MAKE_SCRIPT = """
import sys
import torch
sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[1]).parent))
import archs as zoo

folder, arch = sys.argv[2], sys.argv[3]
width, samples, size = (int(v) for v in sys.argv[4:7])
model = zoo.build(arch, width=width)
gen = torch.Generator().manual_seed(1)
sd = model.state_dict()
for key, value in sd.items():
    if key.endswith("running_mean"):
        value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    elif key.endswith("running_var"):
        value.copy_(1 + torch.rand(value.shape, generator=gen))
torch.save({"model": sd}, f"{folder}/ckpt_{arch}.pt")
images = torch.randn(samples, 3, size, size, generator=gen) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
torch.save(images + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1), f"{folder}/inputs.pt")
"""


def _sides(folder: Path, arch: str, args: argparse.Namespace) -> dict[str, list[str]]:
    ckpt, data = str(folder / f"ckpt_{arch}.pt"), str(folder / "inputs.pt")
    spec = ["--model", f"{ARCHS}:build", "--model-arg", f"arch={arch}", "--model-arg", f"width={args.width}",
            "--data", data, "--batch-size", str(args.batch_size)]  # fmt: skip

    def bnaudit(out: str, *extra: str) -> list[str]:
        return bnaudit_argv("recalibrate", ckpt, *spec, *extra, "-o", str(folder / out), "--force",
                            "--quiet", "--format", "json", "--fail-on", "never")  # fmt: skip

    update_bn = [sys.executable, "-c", UPDATE_BN_SCRIPT, str(ARCHS), ckpt, str(folder / "update_bn.pt"), data,
                 arch, str(args.width), str(args.batch_size)]  # fmt: skip
    return {
        "update_bn": update_bn,
        "population": bnaudit("population.pt"),
        "sequential": bnaudit("sequential.pt", "--mode", "sequential"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every side")
    parser.add_argument("--arch", action="append", default=None, help="only these (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.size, args.batch_size, args.width, args.repeats = 32, 16, 16, 4, 1
    env = python_env()
    env["OMP_NUM_THREADS"] = str(args.threads)
    # The smoke run checks the script on one model (the BatchNormAct2d one, the least common path); the
    # full run measures all four.
    archs = args.arch or (["mobilenet"] if args.smoke else ["plain", "resnet", "mobilenet", "head"])
    print(f"{args.samples} images of {args.size} px, batches of {args.batch_size}, width {args.width}, "
          f"{args.repeats} interleaved rounds, OMP_NUM_THREADS={args.threads}; median seconds")  # fmt: skip
    heads = ("update_bn", "population", "sequential", "pop/ub", "seq/ub")
    print(f"{'architecture':<12} " + " ".join(f"{h:>11}" for h in heads))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in archs:
            make = [sys.executable, "-c", MAKE_SCRIPT, str(ARCHS), str(folder), arch, str(args.width),
                    str(args.samples), str(args.size)]  # fmt: skip
            subprocess.run(make, check=True, env=env)
            runs = alternate(_sides(folder, arch, args), args.repeats, env)
            med = {name: statistics.median(r.seconds for r in rs) for name, rs in runs.items()}
            failed = [name for name, rs in runs.items() if any(r.returncode != 0 for r in rs)]
            if failed:
                raise SystemExit(f"{arch}: {', '.join(failed)} failed")
            ub = med["update_bn"]
            print(f"{arch:<12} {ub:>11.3f} {med['population']:>11.3f} {med['sequential']:>11.3f} "
                  f"{med['population'] / ub:>11.2f} {med['sequential'] / ub:>11.2f}")  # fmt: skip
    print("ratio bnaudit / update_bn: see the columns pop/ub and seq/ub")


if __name__ == "__main__":
    main()
