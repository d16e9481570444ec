"""The optional dependencies (pip extras): whether each is installed, and the error that says how to get it.

``pip install bnaudit`` is the gate-only install: inspect, compare and average read checkpoints without
torch. ``drift``, ``recalibrate`` and the in-training API need torch (``bnaudit[torch]``), ``--plot``
needs matplotlib (``bnaudit[plot]``). A missing one is a usage error (exit 2) naming the install command,
never an internal error.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from bnaudit.errors import UsageError

# top-level module -> the pyproject extra that installs it
EXTRAS = {"torch": "torch", "matplotlib": "plot", "fsspec": "remote"}


def install_command(module: str) -> str:
    """The pip command that installs the extra providing ``module``."""
    return f"pip install 'bnaudit[{EXTRAS[module]}]'"


# ImportError.path (the file that failed) is shadowed by BnauditError.path (always None here).
class MissingDependencyError(UsageError, ModuleNotFoundError):  # type: ignore[override]
    """An optional dependency is not installed (CLI exit 2). Also a ModuleNotFoundError, so code that
    handles ``ImportError`` around an optional feature keeps working."""

    def __init__(self, module: str, *, where: str) -> None:
        super().__init__(
            f"needs {module}, which is not installed",
            where=where,
            fix=f"install it: {install_command(module)}",
        )
        self.name = module


def is_installed(module: str) -> bool:
    """True when ``module`` can be found on the import path (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses the name; a module with no spec
        return False


def require(module: str, where: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` is installed (nothing is imported).

    Args:
        module: a key of :data:`EXTRAS`.
        where: what needs it, for the message (``bnaudit drift``, ``--plot``).
    """
    if not is_installed(module):
        raise MissingDependencyError(module, where=where)


def load(module: str, where: str) -> ModuleType:
    """Import ``module`` (an optional dependency) for ``where``.

    Raises:
        MissingDependencyError: it is not installed.
        UsageError: it is installed but its import fails (a broken install: a missing library, ...).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if missing_optional(exc) == module:
            raise MissingDependencyError(module, where=where) from exc
        raise UsageError(
            f"needs {module}, which is installed but cannot be imported",
            where=where,
            found=f"{type(exc).__name__}: {exc}",
            fix=f"reinstall it: {install_command(module)} --force-reinstall",
        ) from exc


def missing_optional(exc: ImportError) -> str | None:
    """The optional dependency ``exc`` failed to import, or None when it is about another module."""
    top = (exc.name or "").partition(".")[0]
    return top if top in EXTRAS else None
