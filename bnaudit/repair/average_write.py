"""Where and how ``average`` writes: the output path and format, the patched copy and its provenance."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.bytesource import shown
from bnaudit.checkpoint.convert import Conversion, convert_checkpoint
from bnaudit.checkpoint.folder_writer import FOLDER_FORMATS
from bnaudit.checkpoint.formats import format_spec
from bnaudit.checkpoint.provenance import header_entry, sidecar_path, sidecar_text
from bnaudit.checkpoint.remote_folder_write import write_repair
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.writer import TensorPatch, WriteResult, check_output_path
from bnaudit.defaults import CONVERSION_FORMATS
from bnaudit.errors import UsageError

log = logging.getLogger(__name__)
FOLDER = "folder"  # the output "format" of a sharded or DCP reference: a repaired copy of the folder


def output_format(reference: Checkpoint, to: str | None, display: str) -> str:
    """The format written: ``to``, else the reference's own family (``pt``, ``safetensors``, or ``folder``
    for a sharded or DCP folder, repaired into a new folder).

    Raises:
        UsageError: ``to`` is not a conversion format, or the reference is a container bnaudit cannot write.
    """
    if to is not None and to not in CONVERSION_FORMATS:
        raise UsageError(f"{to!r} is not one of: {', '.join(CONVERSION_FORMATS)}", where="--to")
    if reference.format in FOLDER_FORMATS:
        if to is not None:
            raise UsageError(
                f"is a {reference.format} folder: it is repaired into a new folder, not converted",
                path=display,
                where="--to",
                fix="drop --to (or pass --reference with a single torch.save or .safetensors file)",
            )
        return FOLDER
    spec = format_spec(reference.format)
    if not spec.patchable:
        raise UsageError(
            f"is a {reference.format} checkpoint, which bnaudit cannot write",
            path=display,
            fix="pass --reference with a single torch.save or .safetensors file that holds the model",
        )
    return to or spec.family.value


def checked_output(out: str | Path | None, dry_run: bool, inputs: Sequence[Path], force: bool) -> Path | None:
    """The output path, checked against the inputs and an existing file (not for a dry run).

    Raises:
        UsageError: no output without ``dry_run``. OutputError: see :func:`check_output_path`.
    """
    if out is None:
        if dry_run:
            return None
        raise UsageError(
            "average needs -o OUT, the checkpoint to write",
            where="-o",
            fix="or pass --dry-run to write nothing",
        )
    out_path = Path(out)
    if dry_run:
        return out_path  # nothing is written, so an existing file is no obstacle
    check_output_path(out_path, list(inputs), force, (sidecar_path(out_path),))
    return out_path


def write_average(
    reference: Checkpoint,
    patches: Sequence[TensorPatch],
    out: Path,
    fmt: str,
    record: dict[str, Any],
    force: bool = False,
) -> tuple[WriteResult, list[str]]:
    """Write the patched copy (or, with another format, a converted one) and its provenance sidecar.

    Args:
        reference: the checkpoint whose bytes are copied.
        patches: the new statistics.
        out: the checkpoint to write; the sidecar goes next to it.
        fmt: ``pt``, ``safetensors`` or ``folder``.
        record: the sidecar's record of the merge (its ``method`` and ``inputs`` also go into the header).
        force: ``--force``: replace an existing output (checked before, with :func:`checked_output`).

    Returns:
        (what was written, notes about what a conversion dropped).
    """
    dropped: list[str] = []

    def companions(result: WriteResult) -> list[tuple[Path, str]]:
        doc = {
            **record,
            "reference": {**record["reference"], "sha256": result.reference_sha256},
            "output": {
                "path": shown(out),
                "format": fmt,
                "sha256": result.output_sha256,
                **({"upload": result.upload} if result.upload else {}),
            },
            "patched_bytes": sum(len(r.data) for r in result.ranges),
            "crc_recomputed": result.crc_entries,
            "header_metadata": result.metadata,
            "dropped": dropped,
        }
        return [(sidecar_path(out), sidecar_text(doc))]

    meta = header_entry("average", record["method"], len(record["inputs"]), None)
    if fmt in (FOLDER, format_spec(reference.format).family.value):
        written = write_repair(
            reference, list(patches), out, metadata=meta, companions=companions, replace_existing=force
        )
        return written, dropped
    conversion = Conversion(fmt, metadata=meta, companions=companions, dropped=dropped, replace=force)
    result = convert_checkpoint(reference, list(patches), out, conversion)
    for note in dropped:
        log.warning(note)
    return result, dropped
