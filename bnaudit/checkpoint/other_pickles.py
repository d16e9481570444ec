"""The other pickles an ambiguous archive holds: read as torch would read them, scanned for their globals."""

from __future__ import annotations

from bnaudit.checkpoint.types import GlobalRef
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load
from bnaudit.checkpoint.zipdir import ZipFormatError
from bnaudit.checkpoint.zipentries import ZipEntry, entry_at, read_member
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
