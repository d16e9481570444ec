"""Exceptions raised by the bnaudit library: structured fields, one formatting rule, one line for the user.

Every error a user sees names up to five things, in this order: the file (``path``), the place inside it
(``where``: a key, a layer, an option, a zip entry), what is wrong (``problem``), what was ``expected`` and
what was ``found``, and what to do next (``fix``). :func:`format_message` is the only place that turns those
fields into text, so every message has the same shape by construction::

    <path>: <where>: <problem>: expected <expected>, found <found>; <fix>

Missing fields are left out with their separators. Tests assert on the fields, not on the text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorFields:
    """The parts of an error message; see the module docstring for how they are joined."""

    problem: str
    path: str | None = None
    where: str | None = None
    expected: str | None = None
    found: str | None = None
    fix: str | None = None


def format_message(fields: ErrorFields) -> str:
    """The one line a user reads for ``fields``."""
    text = fields.problem
    if fields.expected is not None and fields.found is not None:
        text += f": expected {fields.expected}, found {fields.found}"
    elif fields.expected is not None:
        text += f": expected {fields.expected}"
    elif fields.found is not None:
        text += f": found {fields.found}"
    head = ": ".join(part for part in (fields.path, fields.where, text) if part)
    return f"{head}; {fields.fix}" if fields.fix else head


class BnauditError(Exception):
    """Base class for every error bnaudit reports to a user (CLI exit code 2).

    Args:
        problem: what is wrong, as a short clause ("is not a checkpoint", "has a different shape").
        path: the file (or URL) concerned.
        where: the place inside it: a key, a layer, an option, a zip entry.
        expected: what bnaudit needed there.
        found: what it found instead.
        fix: what the user can do next.
    """

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        where: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.fields = ErrorFields(
            problem=problem,
            path=None if path is None else _as_given(path),
            where=where,
            expected=expected,
            found=found,
            fix=fix,
        )
        super().__init__(format_message(self.fields))

    @property
    def path(self) -> str | None:
        return self.fields.path

    @property
    def fix(self) -> str | None:
        return self.fields.fix


class InputError(BnauditError):
    """A file cannot be read, or does not hold what the command needs."""


class UnsupportedFormatError(InputError):
    """The file is a container bnaudit recognises but does not read (e.g. TorchScript)."""


class ModelMismatchError(InputError):
    """Ranks (or a checkpoint and a model) do not describe the same model."""


class NoBatchNormError(InputError):
    """A state dict holds no BatchNorm layers."""


class UsageError(BnauditError):
    """The options given do not make sense together."""


class ConfigError(BnauditError):
    """The [tool.bnaudit] configuration is invalid."""


class OutputError(BnauditError):
    """An output cannot be written (exists without --force, is an input, folder missing, disk full)."""


class InternalError(BnauditError):
    """An invariant of bnaudit itself failed (exit 3): a bug to report."""

    exit_code = 3


class NonFiniteStatisticsError(InputError):
    """New statistics a repair was about to write are NaN or Inf (or overflow their dtype): nothing was
    written. The CLI reports it as an error finding (exit 1) naming the layer and the channel.

    Attributes:
        layer: the layer (module name) whose statistics are unusable.
        channel: the first unusable channel.
        state_dict: the state dict being repaired, once known (set by the checkpoint-level pass).
    """

    def __init__(self, problem: str, *, layer: str, channel: int, found: str, fix: str) -> None:
        super().__init__(problem, where=f"layer '{layer}'", found=found, fix=fix)
        self.layer = layer
        self.channel = channel
        self.state_dict: str | None = None


class UnsafePickleError(InputError):
    """A pickle references a dangerous callable and then turned out corrupt or truncated (exit 1).

    The dangerous global is the finding that matters: it is the first line of the message, and the parse
    error (``parse_error``) the second, so neither is lost and the CLI exits 1 as for an ``unsafe-pickle``
    finding; nothing is written.
    """

    exit_code = 1

    def __init__(self, problem: str, *, path: str, fix: str, parse_error: BnauditError) -> None:
        super().__init__(problem, path=path, fix=fix)
        self.parse_error = parse_error

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.parse_error}"


_MANGLED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def _as_given(path: str | os.PathLike[str]) -> str:
    """The path as the user wrote it: a URL that went through ``Path`` (``s3:/b/k``) gets its ``//`` back."""
    text = os.fspath(path)
    if isinstance(path, os.PathLike) and not isinstance(path, str):
        return _MANGLED_URL.sub(r"\1://", text) if text.split(":", 1)[0].lower() != "file" else text
    return text
