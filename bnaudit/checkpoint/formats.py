"""The container formats bnaudit reads, one spec each: a new container is one entry in ``FORMAT_SPECS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bnaudit.checkpoint.dcp import read_dcp
from bnaudit.checkpoint.legacy import read_legacy
from bnaudit.checkpoint.patch_fixups import NoFixups, PatchFixups, SafetensorsHeaderFixups, ZipCrcFixups
from bnaudit.checkpoint.plain_pickle import read_pickle
from bnaudit.checkpoint.safetensors_io import read_safetensors
from bnaudit.checkpoint.sharded import read_sharded
from bnaudit.checkpoint.torch_tar import read_torch_tar
from bnaudit.checkpoint.torchzip import read_torch_zip
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat

__all__ = ["FORMAT_SPECS", "ContainerFormat", "FormatFamily", "FormatSpec", "format_spec"]

Reader = Callable[[Path], Checkpoint]


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
        reader: reads a file (or folder) of this format inertly; ``state_dicts`` are found afterwards.
        fixups: what the byte-patching writer does besides the patched bytes, or None when it cannot
            write such a file.
        shard: the format may be a shard of a Hugging Face sharded checkpoint.
        notes: one line for ``inspect`` and the docs.
    """

    format: ContainerFormat
    family: FormatFamily
    reader: Reader
    fixups: PatchFixups | None
    shard: bool = False
    notes: str = ""

    @property
    def patchable(self) -> bool:
        """The byte-patching writer can write a repaired copy of such a file."""
        return self.fixups is not None


def _read_sharded(path: Path) -> Checkpoint:
    readers = {spec.format: spec.reader for spec in FORMAT_SPECS.values() if spec.shard}
    return read_sharded(path, readers)


FORMAT_SPECS: dict[ContainerFormat, FormatSpec] = {
    spec.format: spec
    for spec in (
        FormatSpec(ContainerFormat.TORCH_ZIP, FormatFamily.TORCH, read_torch_zip, ZipCrcFixups(), shard=True,
                   notes="torch.save since 1.6: a zip of data.pkl and one raw storage per entry"),
        FormatSpec(ContainerFormat.TORCH_LEGACY, FormatFamily.TORCH, read_legacy, NoFixups(), shard=True,
                   notes="torch.save before 1.6 (legacy serialization): pickles, then raw storages"),
        FormatSpec(ContainerFormat.TORCH_TAR, FormatFamily.OTHER, read_torch_tar, None,
                   notes="torch.save before 1.0: a tar of storages, tensors, pickle (pickles scanned)"),
        FormatSpec(ContainerFormat.PICKLE, FormatFamily.OTHER, read_pickle, None,
                   notes="a plain pickle (tensors in it are not readable without torch)"),
        FormatSpec(ContainerFormat.SAFETENSORS, FormatFamily.SAFETENSORS, read_safetensors,
                   SafetensorsHeaderFixups(), shard=True,
                   notes="safetensors: a JSON header, then raw tensor data"),
        FormatSpec(ContainerFormat.HF_SHARDED, FormatFamily.OTHER, _read_sharded, None,
                   notes="a Hugging Face sharded folder read through its *.index.json"),
        FormatSpec(ContainerFormat.DCP, FormatFamily.OTHER, read_dcp, None,
                   notes="a torch.distributed.checkpoint folder (.metadata and *.distcp files)"),
    )
}  # fmt: skip


def format_spec(fmt: ContainerFormat | str) -> FormatSpec:
    """The spec of ``fmt`` (a member or its string value).

    Args:
        fmt: a ContainerFormat, or its value as reports print it (``torch-zip``).

    Returns:
        The FormatSpec.

    Raises:
        ValueError: ``fmt`` names no container format.
    """
    return FORMAT_SPECS[ContainerFormat(fmt)]
