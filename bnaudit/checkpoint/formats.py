"""The container formats bnaudit reads, one spec each: a new container is one entry in ``FORMAT_SPECS``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ContainerFormat(str, Enum):
    """A checkpoint container, named as reports and ``inspect`` print it."""

    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    PICKLE = "pickle"
    SAFETENSORS = "safetensors"
    HF_SHARDED = "hf-sharded"
    DCP = "dcp"


class FormatFamily(str, Enum):
    """What a converted output of this container is written as (``--to``): its family's own writer."""

    TORCH = "pt"
    SAFETENSORS = "safetensors"
    OTHER = "other"


@dataclass(frozen=True)
class FormatSpec:
    """What bnaudit knows about one container format.

    Attributes:
        format: the container.
        family: the family a repaired copy keeps (``pt`` for torch.save files, ``safetensors``).
        patchable: the byte-patching writer can write a repaired copy of such a file.
        zip_crcs: patched bytes lie in zip entries whose CRC-32s must be rewritten.
        safetensors_header: a repaired copy may carry new ``__metadata__`` in its JSON header.
        notes: one line for ``inspect`` and the docs.
    """

    format: ContainerFormat
    family: FormatFamily
    patchable: bool
    zip_crcs: bool = False
    safetensors_header: bool = False
    notes: str = ""


FORMAT_SPECS: dict[ContainerFormat, FormatSpec] = {
    spec.format: spec
    for spec in (
        FormatSpec(ContainerFormat.TORCH_ZIP, FormatFamily.TORCH, True, zip_crcs=True,
                   notes="torch.save since 1.6: a zip of data.pkl and one raw storage per entry"),
        FormatSpec(ContainerFormat.TORCH_LEGACY, FormatFamily.TORCH, True,
                   notes="torch.save before 1.6 (legacy serialization): pickles, then raw storages"),
        FormatSpec(ContainerFormat.PICKLE, FormatFamily.OTHER, False,
                   notes="a plain pickle (tensors in it are not readable without torch)"),
        FormatSpec(ContainerFormat.SAFETENSORS, FormatFamily.SAFETENSORS, True, safetensors_header=True,
                   notes="safetensors: a JSON header, then raw tensor data"),
        FormatSpec(ContainerFormat.HF_SHARDED, FormatFamily.OTHER, False,
                   notes="a Hugging Face sharded folder read through its *.index.json"),
        FormatSpec(ContainerFormat.DCP, FormatFamily.OTHER, False,
                   notes="a torch.distributed.checkpoint folder (.metadata and *.distcp files)"),
    )
}  # fmt: skip


def format_spec(fmt: ContainerFormat | str) -> FormatSpec:
    """The spec of ``fmt`` (a member or its string value)."""
    return FORMAT_SPECS[ContainerFormat(fmt)]
