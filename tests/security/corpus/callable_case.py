"""Registering a callable case: a payload spliced into a real torch.save zip's data.pkl."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.security.corpus.carriers import torch_zip_with
from tests.security.corpus.ops import call, glob, text
from tests.security.corpus.registry import case

TOUCH = "/usr/bin/touch"
Payload = Callable[[str], bytes]


def in_zip(
    name: str, expect: tuple[str, ...], protocol: int = 2, requires: tuple[str, ...] = ()
) -> Callable[[Payload], Payload]:
    """Register ``payload(marker)`` spliced into a torch zip's data.pkl as case ``name`` (``requires``: the
    modules the victim needs for the payload to run; without them the case is skipped)."""

    def register(payload: Payload) -> Payload:
        def build(folder: Path, marker: str) -> Path:
            return torch_zip_with(folder / f"{name}.pt", payload(marker), protocol)

        case(name, "callable", expect, requires=requires)(build)
        return payload

    return register


def attr(obj: bytes, attribute: str) -> bytes:
    """``operator.attrgetter(attribute)(obj)``."""
    return call(call(glob("_operator", "attrgetter"), text(attribute)), obj)
