"""A user class pickled into timm-style test checkpoints (loadable with torch.load(weights_only=False))."""

from __future__ import annotations


class RunInfo:
    """Stands for the arbitrary objects training scripts put in checkpoints."""

    def __init__(self, name: str, best: float) -> None:
        self.name = name
        self.best = best

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunInfo) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]
