"""Where a finding is, for the formats that point at files: paths relative to the repository root."""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from urllib.parse import quote

from bnaudit.report.model import Finding, Report


def repository_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working folder) holding ``.git``, if any.

    ``.git`` may be a file (worktrees, submodules), so its existence is what counts; git itself is not run.
    """
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def relative_path(path: str, root: Path | None = None) -> str:
    """``path`` (as given on the command line) relative to the repository root, else to the working folder.

    Code-scanning services and annotations resolve paths against the checkout, whatever folder the gate ran
    in; a path outside both stays as given (absolute), POSIX-style.
    """
    absolute = (Path.cwd() / path).resolve()
    for base in (root if root is not None else repository_root(), Path.cwd().resolve()):
        if base is not None and absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix()
    return PurePath(os.path.normpath(path)).as_posix()


def finding_file(finding: Finding, report: Report) -> str | None:
    """The checkpoint a finding is about: its own file, else the report's first input."""
    if finding.file:
        return finding.file
    return report.inputs[0].path if report.inputs else None


def as_uri_reference(path: str) -> str:
    """A relative path as a URI reference (spaces and other reserved characters percent-encoded)."""
    return quote(path, safe="/")
