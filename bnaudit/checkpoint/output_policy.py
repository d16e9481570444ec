"""The one rule for every file a bnaudit command writes, checked before any work: nothing is ever lost.

Every output — the checkpoint of ``average`` / ``recalibrate``, its provenance sidecar, a report (``-o``,
``--report``), a baseline (``--write-baseline``), a plot (``--plot``) — is checked here, all of a command's
outputs at once and before it reads a tensor, so that a refusal costs nothing and leaves nothing:

- an output is never an input: the same real path (symbolic links resolved, glob patterns expanded), the
  same file under another name (a hard link: same device and inode), or a file inside an input folder;
  nor a folder that holds an input (a repaired sharded or DCP folder is an output folder);
- an output is never another output of the same run;
- an existing checkpoint — recognised by its content, whatever its name — is replaced only by a command
  that writes checkpoints, and only with ``--force``; an existing sidecar likewise needs ``--force``;
- a report, baseline or plot replaces only a file that is itself a report: text (every report format, and
  SVG), or the image format the plot writes; never a checkpoint or other binary data, even with ``--force``.

A violation raises :class:`OutputError` (exit 2) naming the file and what to do.
"""

from __future__ import annotations

import codecs
import glob
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bnaudit.checkpoint.bytesource import remote_exists, url_of
from bnaudit.checkpoint.detect import detect_format
from bnaudit.checkpoint.rank_files import expand_arguments
from bnaudit.errors import InputError, OutputError

_SNIFF_BYTES = 64 * 1024
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EVEN_FORCED = {True: ", even with --force", False: ""}


class OutputKind(Enum):
    """What an output is, which decides what it may replace."""

    CHECKPOINT = "checkpoint"
    SIDECAR = "provenance sidecar"
    REPORT = "report"
    BASELINE = "baseline"
    PLOT = "plot"


@dataclass(frozen=True)
class PlannedOutput:
    """One file a command will write: its path, kind and the option that named it (for the message)."""

    path: Path
    kind: OutputKind
    option: str


@dataclass(frozen=True)
class _Identity:
    real: Path
    inode: tuple[int, int] | None


def _identity(path: Path) -> _Identity:
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(path)
    except OSError:
        return _Identity(real, None)
    return _Identity(real, (st.st_dev, st.st_ino))


def _same(a: _Identity, b: _Identity) -> bool:
    return a.real == b.real or (a.inode is not None and a.inode == b.inode)


def input_paths(arguments: Iterable[str | Path]) -> list[Path]:
    """The files the arguments name, quoted glob patterns expanded (a pattern matching nothing is skipped:
    the command itself reports it)."""
    paths: list[Path] = []
    for arg in arguments:
        try:
            paths.extend(Path(p) for p in expand_arguments([str(arg)]))
        except InputError:
            paths.extend(Path(p) for p in sorted(glob.glob(str(arg))))
    return paths


def check_outputs(
    outputs: Sequence[PlannedOutput], inputs: Iterable[str | Path], *, force: bool = False
) -> None:
    """Refuse, before any work, every output that could lose a file (see the module's rules).

    Args:
        outputs: every file the command will write.
        inputs: every file or folder it reads; glob patterns are expanded.
        force: ``--force`` of a command that writes checkpoints: an existing checkpoint or sidecar output
            may be replaced (never an input, and never by a report).

    Raises:
        OutputError: the first output that breaks a rule, with what to do instead.
    """
    sources = [(p, _identity(p)) for p in input_paths(inputs)]
    seen: list[tuple[PlannedOutput, _Identity]] = []
    for out in outputs:
        url = url_of(out.path)
        if url is not None:  # an object store: nothing local to lose; an existing object needs --force
            if not force and remote_exists(url):
                raise OutputError(
                    "already exists", path=url, where=out.option, fix="pass --force to replace it"
                )
            continue
        _check_folder(out)
        ident = _identity(out.path)
        for src, src_ident in sources:
            _check_not_input(out, ident, src, src_ident, force)
        for other, other_ident in seen:
            if _same(ident, other_ident):
                raise OutputError(
                    f"is given to both {other.option} ({other.kind.value}) and "
                    f"{out.option} ({out.kind.value})",
                    path=out.path,
                    fix="give each output its own file",
                )
        seen.append((out, ident))
        if os.path.lexists(out.path):
            _check_replaceable(out, force)


def _check_folder(out: PlannedOutput) -> None:
    folder = out.path.parent if str(out.path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(
            f"the folder {folder} does not exist",
            path=out.path,
            where=out.option,
            fix="create it or choose another path",
        )


def _check_not_input(
    out: PlannedOutput, ident: _Identity, src: Path, src_ident: _Identity, force: bool
) -> None:
    inside = src.is_dir() and src_ident.real in ident.real.parents
    # A folder output (a repaired sharded or DCP folder) replaced with --force must not hold an input.
    holds = ident.real in src_ident.real.parents
    if not (_same(ident, src_ident) or inside or holds):
        return
    what = f"is inside the input folder {src}" if inside else f"is one of the inputs ({src})"
    what = f"holds the input {src}" if holds and not inside else what
    raise OutputError(
        what,
        path=out.path,
        where=out.option,
        fix=f"bnaudit never writes over an input{_EVEN_FORCED[force]} — choose another {out.option} path",
    )


def _check_replaceable(out: PlannedOutput, force: bool) -> None:
    checkpoint = _checkpoint_format(out.path)
    if out.path.is_dir() and not (out.kind is OutputKind.CHECKPOINT and checkpoint is not None):
        raise OutputError("is a directory", path=out.path, where=out.option, fix="give a file name")
    if out.kind in (OutputKind.CHECKPOINT, OutputKind.SIDECAR):
        if not force:
            raise OutputError(
                "already exists",
                path=out.path,
                where=out.option,
                fix="pass --force to replace it or choose another path",
            )
        return
    if checkpoint is not None:
        raise OutputError(
            f"is a checkpoint ({checkpoint}); a {out.kind.value} never replaces a checkpoint"
            f"{_EVEN_FORCED[force]}",
            path=out.path,
            where=out.option,
            fix=f"choose another {out.option} file",
        )
    if not _is_report_like(out):
        raise OutputError(
            f"exists and is not a report (binary data); a {out.kind.value} replaces only a report",
            path=out.path,
            where=out.option,
            fix=f"choose another {out.option} file, or remove this one if it is yours to lose",
        )


def _checkpoint_format(path: Path) -> str | None:
    """The container format when ``path`` holds a checkpoint (by content, never by name), else None."""
    try:
        return detect_format(path).value
    except InputError:
        return None


def _is_report_like(out: PlannedOutput) -> bool:
    """A regular file of text (every report format; SVG), empty, or a PNG where a plot goes."""
    try:
        if not stat.S_ISREG(os.stat(out.path).st_mode):
            return False
        with open(out.path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError:
        return False
    if out.kind is OutputKind.PLOT and head.startswith(_PNG_MAGIC):
        return True
    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except UnicodeDecodeError:
        return False
    return True
