"""Benchmark ``bnaudit recalibrate`` against ``torch.optim.swa_utils.update_bn``: whole-process time, errors.

Creates, in a temporary folder, a ResNet-style CNN (a stem and three stages of two residual blocks: 15
BatchNorm2d layers) followed by a heavy head without BatchNorm (two 3x3 convolutions with 4x the last
stage's channels, pooling, a linear layer: what the early stop skips), a checkpoint
``{"model": state_dict, "epoch": 90}`` with stale running statistics, and synthetic 3x32x32 inputs
served by a ``DataLoader`` (``benchmod.py:loader``). Then times, as whole processes (start, load the
checkpoint, the pass, write the output), alternating the sides round by round:

- ``bnaudit recalibrate`` (default: population statistics, the forward stops after the last BatchNorm);
- ``bnaudit recalibrate --full-forward`` (runs the head too: the early-stop saving);
- a script doing the same job with ``update_bn``: ``torch.load``, build the model, ``load_state_dict``,
  ``update_bn`` over the same loader, ``torch.save``;
- ``bnaudit recalibrate --channels-last`` and ``--amp`` (bfloat16 autocast on CPU).

Each output's statistics are compared with an exact reference computed here, independently of bnaudit:
hooks capture every BatchNorm input of a float32 forward (BatchNorm normalising by batch statistics, as in
both methods) and merge per-batch moments in float64. Errors are ``max |mean - ref| / ref std`` and
``max |var - ref| / ref var`` over every layer and channel. The reference of a float64 forward shows how far
float32 rounding of the forward alone moves the statistics (the floor of any float32 method).

Usage:
    python benchmarks/bench_recalibrate.py                  # 4,096 samples, batches of 128, 5 rounds
    python benchmarks/bench_recalibrate.py --smoke          # tiny, for CI: checks the script runs
Prints absolute times (median and min over the rounds), peak resident memory, errors and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Run, bnaudit_argv, python_env, run_process

# The model and data module the specs point at (written into the temporary folder).
BENCHMOD = '''
"""Benchmark model and data: a ResNet-style CNN with a head after the last BatchNorm, synthetic images."""
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class Net(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        # A head after the last BatchNorm (no BatchNorm in it), as heavy as a detection or segmentation
        # head: what the early stop skips.
        self.head = nn.Sequential(
            nn.Conv2d(cin, 4 * cin, 3, 1, 1), nn.ReLU(), nn.Conv2d(4 * cin, 4 * cin, 3, 1, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * cin, 10),
        )

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def build(width: int = 16):
    return Net(width)


def loader(batch_size: int = 128):
    inputs = torch.load(HERE / "inputs.pt", weights_only=True)
    dataset = torch.utils.data.TensorDataset(inputs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
'''

UPDATE_BN_SCRIPT = """
import sys
import torch
from torch.optim.swa_utils import update_bn

src, out, folder = sys.argv[1:4]
batch_size, width = int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, folder)
import benchmod

ckpt = torch.load(src, map_location="cpu", weights_only=True)
model = benchmod.build(width)
model.load_state_dict(ckpt["model"])
update_bn(benchmod.loader(batch_size=batch_size), model)
ckpt["model"] = model.state_dict()
torch.save(ckpt, out)
"""


def make_inputs(folder: Path, samples: int, width: int) -> None:
    """Write benchmod.py, inputs.pt and ckpt.pt (child process: the parent never imports torch)."""
    import torch

    (folder / "benchmod.py").write_text(BENCHMOD)
    sys.path.insert(0, str(folder))
    import benchmod

    torch.manual_seed(0)
    model = benchmod.build(width)
    gen = torch.Generator().manual_seed(1)
    sd = model.state_dict()
    for key, value in sd.items():  # stale statistics: what recalibration replaces
        if key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(1 + torch.rand(value.shape, generator=gen))
        elif key.endswith("num_batches_tracked"):
            value.fill_(1000)
    torch.save({"model": sd, "epoch": 90}, folder / "ckpt.pt")
    # Images with per-channel offsets and scales, so the statistics are not trivially 0 / 1.
    images = torch.randn(samples, 3, 32, 32, generator=gen) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    torch.save(images + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1), folder / "inputs.pt")


def _merge_moments(moments: dict[str, list[Any]], name: str, module: Any, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: fold one call's input into ``moments[name]`` = [count, mean, M2] (Chan, float64)."""
    x = args[0].detach().double()
    dims = [0, *range(2, x.dim())]
    n = x.numel() / x.shape[1]
    mean = x.mean(dim=dims)
    m2 = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dim=dims)  # two-pass within the call
    if name not in moments:
        moments[name] = [n, mean, m2]
        return
    count, old_mean, old_m2 = moments[name]
    total = count + n
    delta = mean - old_mean
    moments[name] = [total, old_mean + delta * (n / total), old_m2 + m2 + delta**2 * (count * n / total)]


def make_reference(folder: Path, batch_size: int, width: int) -> None:
    """Exact population statistics of every BatchNorm input (float32 and float64 forwards), as ref.json.

    Written here on purpose, independently of bnaudit: forward pre-hooks on BatchNorm layers in train mode
    (every other module in eval mode), per-batch mean and M2 in float64 merged with Chan's formulas.
    """
    import torch

    sys.path.insert(0, str(folder))
    import benchmod

    out: dict[str, dict[str, list[float]]] = {}
    for dtype in (torch.float32, torch.float64):
        model = benchmod.build(width)
        model.load_state_dict(torch.load(folder / "ckpt.pt", weights_only=True)["model"])
        model = model.to(dtype).eval()
        moments: dict[str, list[Any]] = {}  # layer -> [count, mean, M2], float64
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.train()  # normalise by batch statistics, as both methods do
                module.register_forward_pre_hook(partial(_merge_moments, moments, name))
        with torch.no_grad():
            for (x,) in benchmod.loader(batch_size=batch_size):
                model(x.to(dtype))
        tag = "f32" if dtype == torch.float32 else "f64"
        for name, (count, mean, m2) in moments.items():
            out.setdefault(name, {})[f"{tag}_mean"] = mean.tolist()
            out[name][f"{tag}_var"] = (m2 / (count - 1)).tolist()
    (folder / "ref.json").write_text(json.dumps(out))


def measure_errors(folder: Path, outputs: list[str]) -> None:
    """Print, as JSON, each output's max relative errors against the float32-forward reference."""
    import numpy as np
    import torch

    ref = json.loads((folder / "ref.json").read_text())

    def errors(stats: dict[str, tuple[np.ndarray, np.ndarray]], tag: str) -> dict[str, float]:
        mean_err = var_err = 0.0
        for name, (mean, var) in stats.items():
            ref_mean, ref_var = np.array(ref[name][f"{tag}_mean"]), np.array(ref[name][f"{tag}_var"])
            mean_err = max(mean_err, float(np.max(np.abs(mean - ref_mean) / np.sqrt(ref_var))))
            var_err = max(var_err, float(np.max(np.abs(var - ref_var) / ref_var)))
        return {"mean": mean_err, "var": var_err}

    result = {}
    for path in outputs:
        sd = torch.load(folder / path, weights_only=True)["model"]
        stats = {name: (sd[f"{name}.running_mean"].double().numpy(),
                        sd[f"{name}.running_var"].double().numpy()) for name in ref}  # fmt: skip
        result[path] = errors(stats, "f32")
    f64 = {name: (np.array(v["f64_mean"]), np.array(v["f64_var"])) for name, v in ref.items()}
    result["float64 forward"] = errors(f64, "f32")
    result["layers"] = {"mean": float(len(ref)), "var": 0.0}
    print(json.dumps(result))


def _summary(runs: list[Run]) -> tuple[float, float, float]:
    """Median seconds, min seconds, max peak MiB."""
    return (
        statistics.median(r.seconds for r in runs),
        min(r.seconds for r in runs),
        max(r.peak_mib for r in runs),
    )


def _ratio(label: str, num: tuple[float, float, float], den: tuple[float, float, float]) -> str:
    return f"ratio {label}: median {num[0] / den[0]:.3f} (min {num[1] / den[1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (x2, x4 later)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each round runs every side once")
    parser.add_argument(
        "--amp-repeats", type=int, default=1, help="rounds for --amp (slow without bf16 CPUs)"
    )
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every side")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round, main rows only (for CI)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the temporary files")
    parser.add_argument("--child", choices=["make", "errors"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("outputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.batch_size, args.width, args.repeats, args.amp_repeats = 96, 32, 4, 1, 1
    if args.child == "make":
        make_inputs(args.folder, args.samples, args.width)
        return make_reference(args.folder, args.batch_size, args.width)
    if args.child == "errors":
        return measure_errors(args.folder, args.outputs)

    env = python_env()
    env["OMP_NUM_THREADS"] = str(args.threads)  # the same for every side (torch reads it at start)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        sizes = [
            "--samples",
            str(args.samples),
            "--batch-size",
            str(args.batch_size),
            "--width",
            str(args.width),
        ]
        child = [sys.executable, __file__, *sizes, "--folder", str(folder), "--child"]
        subprocess.run([*child, "make"], check=True, env=env)
        ckpt = str(folder / "ckpt.pt")
        module = folder / "benchmod.py"
        spec = ["--model", f"{module}:build", "--model-arg", f"width={args.width}",
                "--data", f"{module}:loader", "--batch-size", str(args.batch_size)]  # fmt: skip

        def bnaudit(out: str, *extra: str) -> list[str]:
            return bnaudit_argv("recalibrate", ckpt, *spec, *extra, "-o", str(folder / out), "--force",
                                "--quiet", "--format", "json", "--fail-on", "never")  # fmt: skip

        update_bn = [sys.executable, "-c", UPDATE_BN_SCRIPT, ckpt, str(folder / "update_bn.pt"), str(folder),
                     str(args.batch_size), str(args.width)]  # fmt: skip
        sides = {
            DEFAULT: (bnaudit("bnaudit.pt"), "bnaudit.pt"),
            FULL: (bnaudit("full.pt", "--full-forward"), "full.pt"),
            UPDATE_BN: (update_bn, "update_bn.pt"),
        }
        if not args.smoke:  # CI checks the script; tests/live/test_recalibrate_options.py checks the options
            sides[CHANNELS_LAST] = (bnaudit("cl.pt", "--channels-last"), "cl.pt")
            sides[AMP] = (bnaudit("amp.pt", "--amp"), "amp.pt")
            sides[BATCH_MEAN] = (bnaudit("batch_mean.pt", "--method", "batch-mean"), "batch_mean.pt")
        runs = _time_sides(sides, args, env)
        outputs = [out for _, out in sides.values()]
        measured = subprocess.run(
            [*child, "errors", *outputs], check=True, env=env, capture_output=True, text=True
        )
        errors = json.loads(measured.stdout)
    _print(args, sides, runs, errors)


DEFAULT = "bnaudit recalibrate"
FULL = "bnaudit recalibrate --full-forward"
UPDATE_BN = "update_bn script"
CHANNELS_LAST = "bnaudit recalibrate --channels-last"
AMP = "bnaudit recalibrate --amp (bf16)"
BATCH_MEAN = "bnaudit recalibrate --method batch-mean"


def _time_sides(
    sides: dict[str, tuple[list[str], str]], args: argparse.Namespace, env: dict[str, str]
) -> dict[str, list[Run]]:
    """Run every side ``args.repeats`` times (``--amp``: ``args.amp_repeats``), rotating the order."""
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    if not args.smoke:
        for name, (argv, _) in sides.items():  # warm-up: page cache and .pyc files (--amp: slow, same code)
            if name != AMP:
                run_process(argv, env)
    names = list(sides)
    for round_index in range(args.repeats):
        # Rotate the order round by round so drift in machine speed hits every side alike.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name == AMP and round_index >= args.amp_repeats:
                continue
            run = run_process(sides[name][0], env)
            if run.returncode not in (0, 1):
                sys.exit(f"{name} exited {run.returncode}")
            runs[name].append(run)
    return runs


def _print(
    args: argparse.Namespace,
    sides: dict[str, tuple[list[str], str]],
    runs: dict[str, list[Run]],
    errors: dict[str, dict[str, float]],
) -> None:
    layers = int(errors.pop("layers")["mean"])
    print(f"{args.samples} samples 3x32x32, batches of {args.batch_size}, width {args.width} ({layers} "
          f"BatchNorm layers), OMP_NUM_THREADS={args.threads}, {args.repeats} rounds")  # fmt: skip
    print(f"{'run':40} {'median s':>9} {'min s':>8} {'peak MiB':>9} {'mean err':>10} {'var err':>10}")
    for name, (_, out) in sides.items():
        med, low, peak = _summary(runs[name])
        err = errors[out]
        print(f"{name:40} {med:9.3f} {low:8.3f} {peak:9.1f} {err['mean']:10.2e} {err['var']:10.2e}")
    floor = errors["float64 forward"]
    print(f"{'float64 forward (float32 rounding floor)':40} {'':9} {'':8} {'':9} {floor['mean']:10.2e} "
          f"{floor['var']:10.2e}")  # fmt: skip
    ours, full, theirs = _summary(runs[DEFAULT]), _summary(runs[FULL]), _summary(runs[UPDATE_BN])
    print(_ratio("bnaudit / update_bn", ours, theirs))
    print(_ratio("bnaudit --full-forward / update_bn", full, theirs))
    print(f"early-stop saving (1 - default / --full-forward): median {1 - ours[0] / full[0]:.1%} "
          f"(min {1 - ours[1] / full[1]:.1%})")  # fmt: skip
    for name in (CHANNELS_LAST, AMP):
        if name in runs:
            print(
                _ratio(f"{name.removeprefix('bnaudit recalibrate ')} / default", _summary(runs[name]), ours)
            )
    exactness = errors["update_bn.pt"]["var"] / max(errors["bnaudit.pt"]["var"], 1e-300)
    print(f"var error update_bn / bnaudit: {exactness:.3g}x")


if __name__ == "__main__":
    main()
