"""Turn compare/average arguments into an ordered list of per-rank files (glob expansion, rank numbers)."""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bnaudit.checkpoint.bytesource import remote_glob, url_of
from bnaudit.errors import InputError, UsageError

log = logging.getLogger(__name__)

_RANK_IN_NAME = re.compile(r"rank[_-]?(\d+)", re.IGNORECASE)
_ANY_INTEGER = re.compile(r"\d+")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class RankFile:
    """One rank's checkpoint: the path as the user wrote it, the resolved path, and its rank number."""

    path: Path
    display: str
    rank: int


def rank_from_name(path: Path, position: int) -> int:
    """A per-rank file's rank: the number after ``rank`` in its name, else its last integer, else position.

    Only the file name counts (for a directory, its own name), so folder names such as ``run3/`` do not.
    """
    name = path.name
    match = _RANK_IN_NAME.findall(name)
    if match:
        return int(match[-1])
    numbers = _ANY_INTEGER.findall(name)
    if numbers:
        return int(numbers[-1])
    return position


def expand_arguments(arguments: list[str]) -> list[str]:
    """Expand quoted glob patterns (``"ckpt_rank*.pt"``) that are not themselves existing paths."""
    expanded: list[str] = []
    for arg in arguments:
        if _GLOB_CHARS.search(arg) and not os.path.exists(arg):
            url = url_of(arg)
            matches = sorted(glob.glob(arg)) if url is None else remote_glob(url)
            if not matches:
                raise InputError("the pattern matches no file", path=arg, fix="check the path and quoting")
            expanded.extend(matches)
        else:
            expanded.append(arg)
    return expanded


def resolve_rank_files(arguments: list[str], minimum: int = 2) -> tuple[list[RankFile], list[str]]:
    """Order per-rank checkpoints by rank; the lowest rank is the reference.

    Args:
        arguments: paths or glob patterns, as given on the command line.
        minimum: how many distinct files the command needs.

    Returns:
        (files ordered by rank, warnings such as a file given twice).

    Raises:
        InputError: a pattern matched nothing, or two files claim the same rank.
        UsageError: fewer than ``minimum`` distinct files.
    """
    warnings: list[str] = []
    seen: dict[Path, str] = {}
    files: list[RankFile] = []
    for arg in expand_arguments(arguments):
        resolved = Path(arg).resolve()
        if resolved in seen:
            warnings.append(f"{arg}: given more than once (same file as {seen[resolved]}); counted once")
            continue
        seen[resolved] = arg
        files.append(RankFile(path=Path(arg), display=arg, rank=rank_from_name(Path(arg), len(files))))
    ranks: dict[int, str] = {}
    for f in files:
        if f.rank in ranks:
            # Names without distinguishable rank numbers: fall back to the order given.
            warnings.append(
                f"{f.display}: rank {f.rank} also read from {ranks[f.rank]}; ranks follow argument order"
            )
            files = [RankFile(x.path, x.display, i) for i, x in enumerate(files)]
            break
        ranks[f.rank] = f.display
    if len(files) < minimum:
        raise UsageError(
            f"needs at least {minimum} different checkpoint files (one per rank)",
            found=str(len(files)),
            fix='pass each rank\'s file or a quoted pattern such as "ckpt_rank*.pt"',
        )
    files.sort(key=lambda f: f.rank)
    return files, warnings
