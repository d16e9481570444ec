"""Measuring BatchNorm subclasses with their own forward at their ``batch_norm`` call.

A ``_BatchNorm`` subclass with its own forward (timm's ``BatchNormAct2d``, a framework's norm wrapper) runs
its own code around the one call that matters, ``torch.nn.functional.batch_norm(x, running_mean, ...)``.
During the pass that function is replaced by :class:`BatchNormTap`: a call carrying the running_mean buffer
of a measured layer (recognised by the buffer's identity: one dict lookup per call, whatever the number of
layers) is served by that layer's measuring call (statistics and normalisation in one kernel call where that
is exact); every other call goes to torch's function unchanged. So such a layer costs what a plain
BatchNorm2d costs, where observing its input from a hook and letting it run costs a second pass over the
input. A layer whose forward never makes that call (it calls ``torch.batch_norm`` itself, say) is still
measured: its forward is wrapped to fold its input in afterwards when the tap did not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnaudit.errors import InputError
from bnaudit.live.accumulate import buffer_of

# (input, weight, bias, eps) -> the normalised input; raises StopForward after the forward's last call
MeasuredCall = Callable[[torch.Tensor, Any, Any, float], torch.Tensor]


class BatchNormTap:
    """Stands in for ``torch.nn.functional.batch_norm`` while installed (see the module docstring)."""

    def __init__(self) -> None:
        self.original: Callable[..., torch.Tensor] = nn.functional.batch_norm
        self.calls: dict[int, tuple[torch.Tensor, MeasuredCall]] = {}
        self.served: set[int] = set()
        self.installed = False
        self.fallbacks = 0  # calls measured by the fallback forward (after the layer ran)

    def add(self, running_mean: torch.Tensor, call: MeasuredCall) -> None:
        """Serve the calls that normalise with ``running_mean`` by ``call``."""
        self.calls[id(running_mean)] = (running_mean, call)

    def __call__(
        self,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        # Whatever ``training`` says: the measuring call normalises as the pass needs (batch statistics in a
        # population pass, the running ones in an eval-mode pass).
        found = self.calls.get(id(running_mean)) if running_mean is not None else None
        if found is None or found[0] is not running_mean:
            return self.original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        self.served.add(id(running_mean))
        return found[1](input, weight, bias, eps)

    def install(self) -> None:
        if self.calls and not self.installed:
            nn.functional.batch_norm = self
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            nn.functional.batch_norm = self.original
            self.installed = False


def fallback_forward(
    module: nn.Module, tap: BatchNormTap, measure_input: Callable[[torch.Tensor], None]
) -> Callable[..., Any]:
    """``module``'s forward, wrapped to measure its input afterwards when the tap did not serve its call.

    A wrapper set as the instance's ``forward`` rather than a pair of forward hooks: a module with hooks
    takes torch's slow call path, which on small inputs costs as much as the BatchNorm itself.
    """
    original = module.forward
    key = id(buffer_of(module, "running_mean"))

    def forward(*args: Any, **kwargs: Any) -> Any:
        tap.served.discard(key)
        out = original(*args, **kwargs)
        if key not in tap.served:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise InputError("was called without a tensor input", where=f"module {type(module).__name__}")
            tap.fallbacks += 1
            measure_input(x)
        return out

    return forward
