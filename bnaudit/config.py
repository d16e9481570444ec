"""[tool.bnaudit] configuration: finding the file, reading its tables, and the precedence between them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnaudit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport (a dependency there)
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

PYPROJECT = "pyproject.toml"
BNAUDIT_TOML = "bnaudit.toml"


@dataclass(frozen=True)
class Config:
    """The settings read from one configuration file (or none).

    Attributes:
        path: the file read; ``None`` when no file was found (every setting is a default).
        table: the TOML table the settings came from: ``tool.bnaudit`` in a pyproject.toml, ``""`` for the
            top level of a bnaudit.toml.
        global_settings: keys of the table itself, for every command that has them.
        command_settings: command name -> keys of its subtable (``[tool.bnaudit.compare]``).
    """

    path: Path | None = None
    table: str = ""
    global_settings: dict[str, Any] = field(default_factory=dict)
    command_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def label(self, command: str | None = None) -> str:
        """Where a setting came from, for messages: ``pyproject.toml [tool.bnaudit.compare]``."""
        parts = [p for p in (self.table, command) if p]
        return f"{self.path} [{'.'.join(parts)}]" if parts else str(self.path)

    def where(self, command: str | None = None, key: str | None = None) -> str | None:
        """The place of a setting inside the file, for errors: ``[tool.bnaudit.compare] error-kl``."""
        parts = [p for p in (self.table, command) if p]
        table = f"[{'.'.join(parts)}]" if parts else None
        return " ".join(p for p in (table, key) if p) or None

    def folder(self) -> Path:
        """The folder relative paths in the file are resolved against."""
        return self.path.parent if self.path is not None else Path.cwd()


def find_config_file(start: Path) -> Path | None:
    """The configuration file that applies in ``start``: the nearest bnaudit.toml, or pyproject.toml with a
    ``[tool.bnaudit]`` table, in ``start`` or a folder above it.

    The search stops at the first folder holding ``.git`` (the repository root) or at the filesystem root,
    so that a checkout is never configured by a file outside it. A pyproject.toml without the table is
    passed over (the way ruff does): a missing table means defaults, not "stop here".

    Raises:
        ConfigError: a pyproject.toml on the way is not valid TOML.
    """
    folder = start.resolve()
    while True:
        candidate = folder / BNAUDIT_TOML
        if candidate.is_file():
            return candidate
        candidate = folder / PYPROJECT
        if candidate.is_file() and _has_tool_table(candidate):
            return candidate
        if (folder / ".git").exists() or folder.parent == folder:
            return None
        folder = folder.parent


def load_config(explicit: Path | None = None, start: Path | None = None) -> Config:
    """Read the configuration: ``explicit`` (``--config FILE``) if given, else the file found from ``start``.

    A file named pyproject.toml is read through its ``[tool.bnaudit]`` table (missing: defaults); any other
    file (bnaudit.toml) holds the settings at its top level.

    Raises:
        ConfigError: the file is missing, not valid TOML, or its tables are not tables.
    """
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(
                "no such configuration file (given with --config)",
                path=explicit,
                fix="check the path, or pass --no-config",
            )
        path: Path | None = explicit
    else:
        path = find_config_file(start if start is not None else Path.cwd())
    if path is None:
        return Config()
    document = _read_toml(path)
    if path.name == PYPROJECT:
        return _split(path, "tool.bnaudit", _tool_table(document, path))
    return _split(path, "", document)


def _read_toml(path: Path) -> dict[str, Any]:
    if tomllib is None:  # pragma: no cover - only on Python 3.10 without tomli
        raise ConfigError("reading TOML on Python 3.10 needs tomli", path=path, fix="pip install tomli")
    try:
        with path.open("rb") as handle:
            return dict(tomllib.load(handle))
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file ({exc.strerror})", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"not valid TOML ({exc})", path=path, fix="fix the file or pass --no-config"
        ) from exc


def _has_tool_table(path: Path) -> bool:
    return bool(_tool_table(_read_toml(path), path))


def _tool_table(document: dict[str, Any], path: Path) -> dict[str, Any]:
    tool = document.get("tool", {})
    table = tool.get("bnaudit", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise ConfigError(
            "must be a table ([tool.bnaudit]), not a single value", path=path, where="tool.bnaudit"
        )
    return table


def _split(path: Path, table: str, settings: dict[str, Any]) -> Config:
    # Sub-tables are per-command settings; every other key is global. Which names are commands, and which
    # keys each command accepts, is the command line's business (bnaudit.cli checks them).
    global_settings = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    command_settings = {k: dict(v) for k, v in settings.items() if isinstance(v, dict)}
    for name, sub in command_settings.items():
        nested = next((k for k, v in sub.items() if isinstance(v, dict)), None)
        if nested is not None:
            where = ".".join(p for p in (table, name) if p)
            raise ConfigError(
                f"'{nested}' is a table", path=path, where=f"[{where}]", fix="settings here are single values"
            )
    return Config(path, table, global_settings, command_settings)
