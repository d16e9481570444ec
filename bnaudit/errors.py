"""Exceptions raised by the bnaudit library; each carries one line a user can act on."""

from __future__ import annotations


class BnauditError(Exception):
    """Base class for every error bnaudit reports to a user (CLI exit code 2).

    The message is a single line that names the file, the key or layer, what was expected,
    what was found, and what to do next.
    """

    exit_code = 2


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
