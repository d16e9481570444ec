"""``--device`` / ``RecalibrationOptions.device``: checked against the devices this machine has, before use.

torch itself answers an unavailable device late and obscurely (an ``AssertionError`` "Torch not compiled
with CUDA enabled" from the first ``.to``, an "invalid device ordinal" from the first kernel); a usage
error naming the devices there are is what a user can act on.
"""

from __future__ import annotations

import torch

from bnaudit.errors import UsageError

_ACCELERATORS = ("cuda", "xpu")  # torch.<name>.is_available() / device_count()


def available_devices() -> list[str]:
    """The devices a pass can run on here: ``cpu``, then ``cuda:0``, ... (and ``mps`` / ``xpu:N``)."""
    found = ["cpu"]
    for kind in _ACCELERATORS:
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [f"{kind}:{i}" for i in range(backend.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def _count(kind: str) -> int:
    """How many devices of ``kind`` there are (0: none, or a kind torch cannot run a model on)."""
    if kind == "cpu":
        return 1
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    backend = getattr(torch, kind, None) if kind in _ACCELERATORS else None
    return backend.device_count() if backend is not None and backend.is_available() else 0


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device once it is known to exist here.

    Raises:
        UsageError: not a device name (``gpu``), a kind this machine lacks (``cuda`` on a CPU-only torch,
            ``mps`` off a Mac), or an index past the last device (``cuda:7`` on a one-GPU machine); the
            message lists the devices there are.
    """
    where = f"--device {device}"
    available = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError("is not a device name", where=where, expected=f"one of: {available}") from None
    count = _count(dev.type)
    if count == 0:
        raise UsageError(
            f"no {dev.type} device is available on this machine", where=where, expected=f"one of: {available}"
        )
    if dev.index is not None and (dev.index >= count or (dev.type == "cpu" and dev.index != 0)):
        raise UsageError(
            f"there is no {dev.type} device number {dev.index}", where=where, expected=f"one of: {available}"
        )
    return dev
