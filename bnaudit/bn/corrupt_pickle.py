"""A corrupt pickle that named a dangerous global before it broke: the dangerous global is the finding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bnaudit.bn.pickle_policy import pickle_findings
from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.unpickler import CorruptPickleError
from bnaudit.errors import BnauditError, InputError, UnsafePickleError
from bnaudit.report.model import Finding, FindingKind


def unsafe_or_corrupt(exc: CorruptPickleError, display: str) -> InputError:
    """The error every command raises for a pickle that turned out corrupt or truncated.

    Args:
        exc: the reader's error, carrying the globals the pickle referenced before it broke.
        display: the file as the user named it.

    Returns:
        An UnsafePickleError (exit 1, the unsafe-pickle message first and the parse error second) when one
        of those globals is dangerous, else ``exc`` itself (exit 2).
    """
    unsafe = [f for f in pickle_findings(exc.globals, display) if f.kind is FindingKind.UNSAFE_PICKLE]
    if not unsafe:
        return exc
    return unsafe_error(unsafe, display, exc)


def unsafe_error(unsafe: Sequence[Finding], display: str, error: BnauditError) -> UnsafePickleError:
    """The exit-1 error for an input whose pickle is unsafe and that ``error`` then stopped.

    The unsafe pickle is what matters (first line), the error it ran into the second line.
    """
    message = "unsafe-pickle: " + "; ".join(f.message for f in unsafe)
    return UnsafePickleError(message, path=display, fix="do not torch.load it", parse_error=error)


def load_or_unsafe(path: str | Path, display: str) -> Checkpoint:
    """:func:`bnaudit.checkpoint.load_checkpoint`, a corrupt pickle's dangerous global raised as the finding.

    Raises:
        UnsafePickleError: the pickle is corrupt but referenced a dangerous callable before it broke (exit 1).
        InputError: the file cannot be read.
    """
    try:
        return load_checkpoint(path)
    except CorruptPickleError as exc:
        raise unsafe_or_corrupt(exc, display) from None
