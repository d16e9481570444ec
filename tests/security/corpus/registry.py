"""The corpus's cases: each a generator writing one file (or folder) and what a gate must say about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Builder = Callable[[Path, str], Path]


@dataclass(frozen=True)
class Case:
    """One corpus entry.

    ``build(folder, marker)`` writes the file into ``folder`` and returns its path; a malicious payload only
    ever creates the file ``marker``. ``expect`` are the qualified names an ``unsafe-pickle`` finding may
    name (any one suffices); ``structure`` marks a zip-structure case, for which an ``ambiguous-archive``
    finding is the expected answer too. ``load`` is how the victim loads it: ``torch`` (torch.load with
    weights_only=False) or ``dcp`` (torch.distributed.checkpoint.load of a folder).
    """

    name: str
    attack_class: str
    build: Builder
    expect: tuple[str, ...] = ()
    malicious: bool = True
    structure: bool = False
    load: str = "torch"
    requires: tuple[str, ...] = field(default=())


CASES: dict[str, Case] = {}


def case(
    name: str,
    attack_class: str,
    expect: tuple[str, ...] = (),
    *,
    structure: bool = False,
    load: str = "torch",
    requires: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register a malicious generator."""

    def register(build: Builder) -> Builder:
        assert name not in CASES, name
        CASES[name] = Case(name, attack_class, build, expect, True, structure, load, requires)
        return build

    return register


def benign(name: str, *, load: str = "torch", requires: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Register a benign generator: a file a real library writes."""

    def register(build: Builder) -> Builder:
        assert name not in CASES, name
        CASES[name] = Case(name, "benign", build, (), False, False, load, requires)
        return build

    return register
