"""Reader for torch zip checkpoints (``torch.save`` since PyTorch 1.6), and for the archives DCP embeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnaudit.checkpoint.bytesource import close, fd_size, open_read
from bnaudit.checkpoint.other_pickles import globals_of, read_other_pickles, refused_pickle_error
from bnaudit.checkpoint.types import Checkpoint, ContainerFormat, StorageRef
from bnaudit.checkpoint.unpickler import MAX_PICKLE_BYTES, CorruptPickleError, inert_load
from bnaudit.checkpoint.unpickler_globals import StorageResolver
from bnaudit.checkpoint.zipdir import ZipDirectory, ZipFormatError, read_directory
from bnaudit.checkpoint.zipentries import ZipEntry, entry_at, local_name, locate_entries, read_member
from bnaudit.checkpoint.zipviews import ArchiveViews, compare_views
from bnaudit.errors import InputError, UnsupportedFormatError

_TRUNCATED = "the file is truncated or corrupt — re-save it or copy it again"
# A compressed member read whole (data.pkl, byteorder) may inflate to at most this many times the file's
# size, or INFLATE_FLOOR bytes for a small file: a zip bomb (a few MB deflating to gigabytes) is refused
# from its declared size before anything is inflated, and inflating never outputs more than that size.
INFLATE_RATIO = 4
INFLATE_FLOOR = 64 << 20


@dataclass(frozen=True)
class TorchArchive:
    """A torch.save zip archive located in a file: its folder, its entries and its pickle's bytes.

    Attributes:
        prefix: the folder every entry lives in, with its trailing ``/`` (``archive/``).
        entries: entry name -> ZipEntry (absolute offsets).
        pickle_name: the ``<prefix>data.pkl`` entry.
        pickle: its bytes (CRC-32 checked, where the archive stores CRC-32s).
        crc32_absent: the archive stores no CRC-32s (``compute_crc32 = False``), so no bytes are verified.
        ambiguities: where torch's reader and zipfile would read the archive differently
            (:mod:`bnaudit.checkpoint.zipviews`).
        other_pickles: (label, bytes) of every other pickle either reader could read as ``data.pkl``.
    """

    prefix: str
    entries: dict[str, ZipEntry]
    pickle_name: str
    pickle: bytes
    crc32_absent: bool = False
    ambiguities: tuple[str, ...] = ()
    other_pickles: tuple[tuple[str, bytes], ...] = ()


# Entries only a torch.export archive (.pt2) holds: its format record (torch >= 2.6) or, before, its
# serialized program; the program's JSON lies under models/.
_EXPORT_RECORDS = frozenset({"archive_format", "serialized_exported_program.json"})


def _refuse_programs(path: Path, names: list[str]) -> None:
    for name in names:
        parts = name.split("/")
        if parts[-1] == "constants.pkl" or (len(parts) > 2 and parts[1] == "code"):
            raise UnsupportedFormatError(
                "is a TorchScript archive (torch.jit.save); bnaudit reads state dicts, not scripted modules",
                path=path,
                fix="save model.state_dict() with torch.save and audit that",
            )
        if parts[-1] in _EXPORT_RECORDS or (
            len(parts) == 3 and parts[1] == "models" and name.endswith(".json")
        ):
            raise UnsupportedFormatError(
                "is a torch.export archive (.pt2, written by torch.export.save); bnaudit reads torch.save "
                "state dicts, not exported programs",
                path=path,
                fix=(
                    "save its weights with torch: torch.save(torch.export.load(PATH).state_dict, "
                    "'weights.pt'), and audit weights.pt"
                ),
            )


def archive_prefix(path: Path, names: list[str]) -> str:
    """The folder every entry of a torch zip lives in (``archive/``, or the file stem for older torch).

    Args:
        path: the file, for messages.
        names: the zip's entry names.

    Returns:
        The prefix including its trailing ``/``.

    Raises:
        UnsupportedFormatError: the zip is a TorchScript archive.
        InputError: the zip holds no ``<name>/data.pkl``, or several.
    """
    _refuse_programs(path, names)
    # Duplicates of one name count once: zipfile reads the last, and compare_views reports the others.
    candidates = sorted(
        {n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    )
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(f"'{c}data.pkl'" for c in candidates)
        raise InputError(
            "is a zip archive but not a torch.save checkpoint",
            path=path,
            expected="one '<name>/data.pkl' entry",
            found=found,
            fix="pass a file written by torch.save",
        )
    return candidates[0]


def inflate_budget(file_size: int) -> int:
    """The most bytes a compressed member of a ``file_size``-byte archive may inflate to."""
    return max(INFLATE_FLOOR, INFLATE_RATIO * file_size)


def _member(path: Path, fd: int, entry: ZipEntry, *, check_name: bool = True) -> bytes:
    budget = inflate_budget(fd_size(fd))
    if entry.compressed and entry.size > budget:
        raise InputError(
            f"zip entry inflates to {entry.size} bytes, over the {budget} byte budget for a file of this "
            f"size ({INFLATE_RATIO} times its size, at least {INFLATE_FLOOR} bytes): a zip bomb or not a "
            "checkpoint",
            path=path,
            where=entry.name,
            fix="re-save the checkpoint with torch.save (which stores its entries uncompressed)",
        )
    try:
        return read_member(fd, entry, check_name=check_name)
    except ZipFormatError as exc:
        raise InputError(
            f"cannot read zip entry ({exc})",
            path=path,
            where=entry.name,
            fix="the file is corrupt — re-save it",
        ) from None


def read_archive(
    path: Path, fd: int, window: tuple[int, int] | None = None, max_pickle: int = MAX_PICKLE_BYTES
) -> TorchArchive:
    """Locate a torch.save archive's entries and read its pickle (and check its byte order record).

    Args:
        path: the file, for messages.
        fd: the file, open for reading.
        window: (start, end) of an archive embedded in a larger file (DCP); the whole file by default.
        max_pickle: the largest pickle accepted, in bytes.

    Returns:
        The TorchArchive.

    Raises:
        UnsupportedFormatError: a TorchScript archive or a big-endian checkpoint.
        InputError: the archive is truncated or corrupt, or its pickle is over ``max_pickle`` bytes.
    """
    base, end = window if window is not None else (0, None)
    try:
        directory = read_directory(fd, base, end)
    except ZipFormatError as exc:
        raise InputError(f"is not a complete zip archive ({exc})", path=path, fix=_TRUNCATED) from None
    prefix, views = _prefix_and_views(path, fd, directory)
    try:
        entries = locate_entries(fd, directory)
        pkl = entries.get(prefix + "data.pkl") or entry_at(fd, views.pickles[0], not directory.crc32_absent)
    except ZipFormatError as exc:
        raise InputError(str(exc), path=path, fix=_TRUNCATED) from None
    byteorder = entries.get(prefix + "byteorder")
    if byteorder is not None and _member(path, fd, byteorder).strip() not in (b"", b"little"):
        raise UnsupportedFormatError(
            f"was saved on a big-endian machine ('{byteorder.name}' says big); bnaudit reads little-endian "
            "checkpoints only",
            path=path,
            fix="load and re-save it on a little-endian machine",
        )
    if pkl.size > max_pickle:
        raise InputError(
            f"is {pkl.size} bytes, over the {max_pickle} byte limit for a checkpoint pickle",
            path=path,
            where=pkl.name,
            fix="save a state dict instead",
        )
    limit = min(max_pickle, inflate_budget(fd_size(fd)))
    others = read_other_pickles(fd, views, pkl, directory.crc32_absent, limit)
    try:
        pickle = _member(path, fd, pkl, check_name=False)
    except InputError as exc:
        raise refused_pickle_error(fd, pkl, exc, str(path), limit) from None
    return TorchArchive(
        prefix, entries, pkl.name, pickle,
        directory.crc32_absent, (*views.differences, *_renamed(fd, pkl)), others,
    )  # fmt: skip


def _renamed(fd: int, pkl: ZipEntry) -> tuple[str, ...]:
    named = local_name(fd, pkl)
    if named == pkl.name:
        return ()
    return (f"'{pkl.name}' is named '{named[:200]}' in its local header: Python's zipfile refuses to "
            "read it, torch's reader reads it",)  # fmt: skip


def _prefix_and_views(path: Path, fd: int, directory: ZipDirectory) -> tuple[str, ArchiveViews]:
    """The archive folder and how torch's reader and zipfile see the archive. Where bnaudit's own view
    (zipfile's) finds no ``<name>/data.pkl`` but torch's reader finds one, torch's is read."""
    names = [rec.name for rec in directory.records]
    try:
        prefix: str | None = archive_prefix(path, names)
    except UnsupportedFormatError:
        raise
    except InputError as exc:
        refusal, prefix = exc, None
    views = compare_views(fd, directory, None if prefix is None else prefix + "data.pkl")
    if prefix is not None:
        return prefix, views
    if views.torch_folder is None or not views.pickles:
        raise refusal
    return views.torch_folder, views


def storage_resolver(path: Path, archive: TorchArchive, label: str = "") -> StorageResolver:
    """Maps the pickle's storage keys to the archive's ``<prefix>data/<key>`` entries.

    Args:
        path: the file holding the archive.
        archive: the archive.
        label: prefixed to storage keys (``file.distcp@offset/``) for an embedded archive.

    Returns:
        The resolver for :func:`bnaudit.checkpoint.unpickler.inert_load`.
    """

    def resolve(key: str, dtype: str, expected_nbytes: int) -> StorageRef:
        name = f"{archive.prefix}data/{key}"
        entry = archive.entries.get(name)
        if entry is None:
            raise InputError(
                f"the pickle refers to storage '{key}' but zip entry '{name}' is missing",
                path=path,
                where=label or None,
                fix="the file is truncated or corrupt — re-save it",
            )
        # nbytes is what the file really holds; a short entry is reported when a tensor is read.
        key_name = f"{label}/{name}" if label else name
        return StorageRef(path, key_name, entry.data_offset, entry.size, dtype, compressed=entry.compressed)

    return resolve


def read_torch_zip(path: Path) -> Checkpoint:
    """Read a ``torch.save`` zip checkpoint without executing its pickle or reading its storages.

    Args:
        path: the file.

    Returns:
        A Checkpoint (format ``torch-zip``) whose root holds lazy TensorRefs; ``state_dicts`` is left empty
        for :func:`bnaudit.checkpoint.load_checkpoint` to fill.

    Raises:
        UnsupportedFormatError: the file is a TorchScript archive or a big-endian checkpoint.
        InputError: the archive is truncated or corrupt, or the pickle refers to a missing storage.
    """
    fd = open_read(path)
    try:
        archive = read_archive(path, fd)
    finally:
        close(fd)
    other_globals = globals_of(archive.other_pickles, str(path))
    try:
        root, refs, warnings = inert_load(
            archive.pickle,
            display=str(path),
            source=archive.pickle_name,
            resolver=storage_resolver(path, archive),
        )
    except CorruptPickleError as exc:
        exc.globals = (*exc.globals, *other_globals)
        raise
    return Checkpoint(
        path,
        ContainerFormat.TORCH_ZIP,
        root,
        globals=[*refs, *(r for r in other_globals if r not in refs)],
        warnings=warnings,
        crc32_absent=archive.crc32_absent,
        ambiguities=list(archive.ambiguities),
    )
