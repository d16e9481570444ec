"""How torch's zip reader and Python's zipfile would each see an archive, and where they part.

torch.load does not read a zip with Python's zipfile but with miniz, through ``PyTorchStreamReader``;
scanners and bnaudit's own reader (:mod:`bnaudit.checkpoint.zipdir`) read it the way zipfile does. On the
archives torch.save writes the views agree; a crafted archive can make them differ, so that a scanner
reads one pickle while torch.load runs another. Where they differ, bnaudit names the difference (the
``ambiguous-archive`` finding) and scans every pickle either reader could reach, never choosing one.

What torch's reader does (miniz 3, as bundled with torch, checked against torch.load itself):
- the end record is the last signature with a whole record after it; the central directory is read at
  the offset it states, never shifted (zipfile shifts every offset when the directory does not end where
  the end record begins, as for a zip appended to other data: two archives, two directories);
- it reads as many records as the end record counts (zipfile reads the directory's bytes to the end);
- the archive folder is the first record's name up to its first ``/``; every record must lie in it;
- ``<folder>/data.pkl`` is looked up ignoring ASCII case, by a binary search over the sorted names, so
  any one of several records of that name (``Data.pkl``, duplicates) may be the one read.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from bnaudit.checkpoint.bytesource import pread
from bnaudit.checkpoint.zipdir import (
    END,
    END_SIGNATURE,
    ZIP64_END,
    ZIP64_END_SIGNATURE,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_SIGNATURE,
    CentralRecord,
    ZipDirectory,
    ZipFormatError,
    end_record_at,
    read_directory,
)

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ZIPFILE_TAIL = END.size + 0xFFFF  # how far back zipfile looks for the end record


@dataclass(frozen=True)
class ArchiveViews:
    """Where torch's reader and zipfile part on one archive.

    Attributes:
        differences: one sentence per difference, naming what each reader reads.
        torch_folder: the folder torch's reader looks in (``archive/``), or None when it refuses the archive.
        pickles: every record either reader could read as ``data.pkl`` (torch's candidates first).
    """

    differences: tuple[str, ...]
    torch_folder: str | None
    pickles: tuple[CentralRecord, ...]


def _fold(name: str) -> str:
    return name.translate(_ASCII_LOWER)


def torch_folder(records: tuple[CentralRecord, ...]) -> str | None:
    """The folder torch's reader resolves every record name in, or None when it refuses the archive."""
    if not records or "/" not in records[0].name:
        return None
    folder = records[0].name.split("/", 1)[0] + "/"
    return folder if all(r.name.startswith(folder) for r in records) else None


def _data_pkl(records: tuple[CentralRecord, ...], folder: str) -> list[CentralRecord]:
    wanted = _fold(folder + "data.pkl")
    # Only a name of the same length can fold to it: the others are not folded (thousands per archive).
    return [r for r in records if len(r.name) == len(wanted) and _fold(r.name) == wanted]


def _zipfile_end_record(fd: int, base: int, end: int) -> int | None:
    """Where zipfile finds the end record: the last 22 bytes when they are one without a comment, else the
    last signature in the last 64 KiB, which must have a whole record after it."""
    if end - base < END.size:
        return None
    last = pread(fd, END.size, end - END.size)
    if last[:4] == END_SIGNATURE and last[-2:] == b"\0\0":
        return end - END.size
    tail_len = min(end - base, _ZIPFILE_TAIL)
    tail = pread(fd, tail_len, end - tail_len)
    at = tail.rfind(END_SIGNATURE)
    return None if at < 0 or tail_len - at < END.size else end - tail_len + at


def _zipfile_shift(fd: int, base: int, eocd_at: int) -> int:
    """zipfile's ``concat``: how far it shifts every offset, because the directory does not end where the
    (ZIP64) end records begin."""
    _, _, _, _, _, size, offset, _ = END.unpack(pread(fd, END.size, eocd_at))
    records_at = eocd_at
    locator_at = eocd_at - ZIP64_LOCATOR.size
    if locator_at - ZIP64_END.size >= base:
        locator = pread(fd, ZIP64_LOCATOR.size, locator_at)
        record = pread(fd, ZIP64_END.size, locator_at - ZIP64_END.size)
        if locator[:4] == ZIP64_LOCATOR_SIGNATURE and record[:4] == ZIP64_END_SIGNATURE:
            fields = ZIP64_END.unpack(record)
            size, offset = fields[8], fields[9]
            records_at = locator_at - ZIP64_END.size
    return int(records_at - base - size - offset)


def _zipfile_view(fd: int, directory: ZipDirectory, differences: list[str]) -> tuple[CentralRecord, ...]:
    """The ``*data.pkl`` records zipfile reads where its view is not bnaudit's (which is torch's), naming
    the difference; empty when the views agree or zipfile cannot read the archive."""
    ours = end_record_at(fd, directory.base, directory.end)
    theirs = _zipfile_end_record(fd, directory.base, directory.end)
    if theirs is None:
        differences.append(f"torch's reader finds the end record at byte {ours}; Python's zipfile finds none")
        return ()
    if theirs != ours:
        differences.append(
            f"torch's reader takes the end record at byte {ours}, Python's zipfile the one at byte {theirs}"
        )
        return ()
    shift = _zipfile_shift(fd, directory.base, ours)
    if shift == 0:
        return ()
    differences.append(
        f"the central directory does not end where the end record begins: torch's reader reads it at byte "
        f"{directory.start}, Python's zipfile at byte {directory.start + shift} (two directories)"
    )
    try:
        shifted = read_directory(fd, directory.base + shift, directory.end)
    except ZipFormatError:
        return ()
    return tuple(r for r in shifted.records if _fold(r.name).endswith("data.pkl"))


def compare_views(fd: int, directory: ZipDirectory, chosen: str | None) -> ArchiveViews:
    """Compare torch's view of an archive with zipfile's (bnaudit's own, ``directory``).

    Args:
        fd: the file.
        directory: the archive's directory as bnaudit (and zipfile) read it.
        chosen: the ``data.pkl`` name bnaudit's view picks (the last record of that name), or None.

    Returns:
        The ArchiveViews.
    """
    differences: list[str] = []
    records, count = directory.records, directory.announced
    if 0 <= count < len(records):
        differences.append(
            f"the end record counts {count} entries but the central directory holds {len(records)}: torch's "
            f"reader reads only the first {count}, Python's zipfile all of them"
        )
        records = records[:count]
    folder = torch_folder(records)
    candidates = _data_pkl(records, folder) if folder is not None else []
    ours = [r for r in directory.records if r.name == chosen][-1:]
    if folder is not None and [r.record_offset for r in candidates] != [r.record_offset for r in ours]:
        found = ", ".join(f"'{r.name}' (record at byte {r.record_offset})" for r in candidates) or "none"
        picked = f"'{chosen}' (the last of that name)" if chosen else "no '<name>/data.pkl'"
        differences.append(
            f"torch's reader looks up '{folder}data.pkl' ignoring case and may read any of: {found}; "
            f"Python's zipfile reads {picked}"
        )
    others = _zipfile_view(fd, directory, differences)
    return ArchiveViews(tuple(differences), folder, (*candidates, *ours, *others))
