"""The other pickles an ambiguous archive holds: read as torch would read them, scanned for their globals."""

from __future__ import annotations

import contextlib

from bnaudit.checkpoint.types import GlobalRef
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load
from bnaudit.checkpoint.zipdir import ZipFormatError
from bnaudit.checkpoint.zipentries import ZipEntry, entry_at, read_member, read_member_as_torch
from bnaudit.checkpoint.zipviews import ArchiveViews
from bnaudit.errors import BnauditError


def read_other_pickles(
    fd: int, views: ArchiveViews, read: ZipEntry, crc32_absent: bool, limit: int
) -> tuple[tuple[str, bytes], ...]:
    """The bytes of every record besides ``read`` that either reader could take for ``data.pkl``.

    They are read as torch's reader reads them (the local header's name is not compared); one that cannot
    be read, or inflates past ``limit`` bytes, is left out: neither reader could run it whole.

    Returns:
        (``name@header offset``, bytes) pairs.
    """
    seen, others = {read.header_offset}, []
    for rec in views.pickles:
        if rec.header_offset in seen:
            continue
        seen.add(rec.header_offset)
        try:
            entry = entry_at(fd, rec, not crc32_absent)
            if entry.size <= limit:
                others.append((f"{rec.name}@{rec.header_offset}", read_member(fd, entry, check_name=False)))
        except ZipFormatError:
            continue
    return tuple(others)


def globals_of(pickles: tuple[tuple[str, bytes], ...], display: str) -> list[GlobalRef]:
    """Every global the pickles reference, also those a corrupt one named before it broke."""
    found: list[GlobalRef] = []
    for label, data in pickles:
        try:
            _, refs, _ = inert_load(data, display=display, source=label)
        except CorruptPickleError as exc:
            refs = list(exc.globals)
        except BnauditError:
            continue
        found.extend(r for r in refs if r not in found)
    return found


def refused_pickle_error(
    fd: int, entry: ZipEntry, error: BnauditError, display: str, limit: int
) -> CorruptPickleError:
    """The error for a pickle entry the zip checks refuse (a bad CRC-32, an encryption flag), carrying the
    globals torch.load would still meet: its reader checks neither, so the pickle is scanned as it reads it
    (when it inflates to at most ``limit`` bytes: a zip bomb is not inflated to be scanned).
    """
    fields = error.fields
    refused = CorruptPickleError(fields.problem, path=display, where=fields.where, fix=fields.fix)
    if entry.size > limit:
        return refused
    with contextlib.suppress(ZipFormatError, BnauditError):  # unreadable to torch too: nothing it runs
        refused.globals = tuple(globals_of(((entry.name, read_member_as_torch(fd, entry)),), display))
    return refused
