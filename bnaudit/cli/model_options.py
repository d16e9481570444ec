"""Options shared by the commands that run a model (recalibrate, drift), as one bundle, and their progress."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import click

from bnaudit.cli.bundles import option_bundle
from bnaudit.live.methods import RecalibrationMethod, RecalibrationMode, choices
from bnaudit.live.options import CalibrationSpec, RecalibrationOptions
from bnaudit.live.specs import parse_kv


@dataclass(frozen=True)
class ModelOptions:
    """The model, data and pass options of ``recalibrate`` / ``drift``, as parsed (:data:`MODEL_OPTIONS`)."""

    model_spec: str
    data_spec: str
    model_args: tuple[str, ...] = ()
    data_args: tuple[str, ...] = ()
    batch_size: int | None = None
    input_index: int = 0
    input_key: str | None = None
    forward_spec: str | None = None
    full_forward: bool = False
    max_samples: int | None = None
    max_batches: int | None = None
    device: str | None = None
    method: str = RecalibrationMethod.POPULATION.value
    mode: str = RecalibrationMode.POPULATION.value
    max_passes: int | None = None
    resident_batches: int = 256
    prefix: str | None = None
    channels_last: bool = False
    amp: bool = False
    amp_dtype: str | None = None
    nproc: int = 1
    quiet: bool = False

    def calibration_spec(self, key: str | None = None, eval_spec: str | None = None) -> CalibrationSpec:
        """The library's CalibrationSpec for these options.

        Raises:
            UsageError: a malformed ``--model-arg`` / ``--data-arg``, or options that do not go together.
        """
        options = RecalibrationOptions(
            method=self.method, max_batches=self.max_batches, max_samples=self.max_samples,
            input_index=self.input_index, input_key=self.input_key, stop_after_last_bn=not self.full_forward,
            device=self.device, channels_last=self.channels_last, amp=self.amp, amp_dtype=self.amp_dtype,
            mode=self.mode, max_passes=self.max_passes, resident_batches=self.resident_batches,
        )  # fmt: skip
        return CalibrationSpec(
            model=self.model_spec,
            data=self.data_spec,
            model_kwargs=parse_kv(self.model_args, "--model-arg"),
            data_kwargs=parse_kv(self.data_args, "--data-arg"),
            batch_size=self.batch_size,
            forward=self.forward_spec,
            prefix=self.prefix,
            key=key,
            eval=eval_spec,
            options=options,
        )


MODEL_OPTIONS = (
    click.option("--model", "model_spec", required=True, metavar="SPEC",
                 help="'package.module:factory' or 'path/to/file.py:factory' returning the nn.Module."),
    click.option("--model-arg", "model_args", multiple=True, default=(), metavar="KEY=VALUE",
                 help="Keyword argument for the model factory (repeatable; JSON values are parsed)."),
    click.option("--data", "data_spec", required=True, metavar="SPEC",
                 help="A callable spec returning an iterable of batches (a DataLoader or a list), or a "
                      "tensor file of inputs (.pt, .safetensors, .npy) batched in order with --batch-size."),
    click.option("--data-arg", "data_args", multiple=True, default=(), metavar="KEY=VALUE",
                 help="Keyword argument for the data callable (repeatable)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Batch size for a tensor file (also passed to a data callable that takes batch_size)."),
    click.option("--input-index", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Position of the input in tuple/list batches."),
    click.option("--input-key", default=None, metavar="KEY", help="Key of the input in dict batches."),
    click.option("--forward", "forward_spec", default=None, metavar="SPEC",
                 help="A callable(model, batch) that runs the model, for batches of any other shape."),
    click.option("--max-samples", type=click.IntRange(min=1), default=None,
                 help="Stop after this many samples."),
    click.option("--max-batches", type=click.IntRange(min=1), default=None,
                 help="Use at most this many batches (counted over all ranks)."),
    click.option("--device", default=None, metavar="DEVICE", help="cpu (default), cuda, cuda:1, ..."),
    click.option("--prefix", default=None, metavar="PREFIX",
                 help="Key prefix the checkpoint adds to the model's keys (found automatically if unique)."),
    click.option("--method", type=click.Choice(list(choices())), default=RecalibrationMethod.POPULATION.value,
                 show_default=True,
                 help="population: exact statistics of all inputs; batch-mean: average of per-batch "
                      "statistics (what torch.optim.swa_utils.update_bn computes)."),
    click.option("--mode", type=click.Choice([m.value for m in RecalibrationMode]),
                 default=RecalibrationMode.POPULATION.value, show_default=True,
                 help="population: measure every layer in one train-mode forward (as update_bn); sequential: "
                      "measure each layer on the inputs eval mode feeds it, earlier layers using their new "
                      "statistics (a few passes; see README)."),
    click.option("--max-passes", type=click.IntRange(min=1), default=None, metavar="N",
                 help="--mode sequential: at most N passes over the data in all (default: until the "
                      "statistics stop moving, at most one per layer plus one)."),
    click.option("--resident-batches", type=click.IntRange(min=0), default=256, show_default=True,
                 metavar="N",
                 help="--mode sequential: one pass with every batch's forward open at once when each process "
                      "has at most N batches (memory: N batches' activations); more: refinement passes "
                      "in constant memory. 0: always refine."),
    click.option("--full-forward", is_flag=True,
                 help="Run every forward to the end (by default the pass stops after the last BatchNorm)."),
    click.option("--channels-last", is_flag=True,
                 help="Run the pass with the model and 4-D inputs in channels_last memory format (often "
                      "faster for convolutions; the statistics are the same to float32 rounding)."),
    click.option("--amp", is_flag=True,
                 help="Run the forward under torch.autocast (mixed precision); moments are still taken in "
                      "float32/float64, only the forward's own rounding changes the statistics."),
    click.option("--amp-dtype", type=click.Choice(["bfloat16", "float16"]), default=None,
                 help="Autocast dtype for --amp (default: bfloat16 on CPU, float16 on CUDA)."),
    click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Run on this many local processes (torch.distributed, gloo on CPU / nccl on CUDA)."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
)  # fmt: skip

model_options = option_bundle(ModelOptions, "model", MODEL_OPTIONS)


def progress_printer(enabled: bool) -> Callable[[int, int | None], None] | None:
    """A progress callback drawing ``batch i/N`` on stderr, or None when disabled or stderr is no terminal."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(done: int, total: int | None) -> None:
        of = f"/{total}" if total else ""
        end = "\n" if total and done >= total else ""
        sys.stderr.write(f"\rbnaudit: batch {done}{of}{end}")
        sys.stderr.flush()

    return show
