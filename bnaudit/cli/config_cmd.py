"""``bnaudit config`` and the check of [tool.bnaudit] against the commands' options (Click's default_map)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from bnaudit.config import Config, load_config
from bnaudit.errors import ConfigError

# Outputs, inputs and --force are given on the command line only: a config file that wrote reports or
# replaced files by itself would surprise whoever runs the command.
# Matched against long option names (without dashes) and parameter names alike.
NOT_CONFIGURABLE = frozenset(
    {"output", "report", "write-baseline", "write_baseline", "plot", "force", "help"}
)
META_KEY = "bnaudit.config"
DEFAULT_SOURCE = "default"


@dataclass
class ResolvedConfig:
    """The file read and, per command, every configurable option's value and where it came from."""

    config: Config
    settings: dict[str, dict[str, tuple[Any, str]]] = field(default_factory=dict)

    def default_map(self) -> dict[str, dict[str, Any]]:
        """Click's default_map: the values set by the file, by command and parameter name."""
        return {
            command: {name: value for name, (value, source) in params.items() if source != DEFAULT_SOURCE}
            for command, params in self.settings.items()
        }


def configurable_options(command: click.Command) -> dict[str, click.Option]:
    """The options of ``command`` a config file may set, by their long name without dashes."""
    out: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in NOT_CONFIGURABLE:
            continue
        long_names = [opt[2:] for opt in param.opts if opt.startswith("--")]
        if long_names and long_names[0] not in NOT_CONFIGURABLE:
            out[long_names[0]] = param
    return out


def resolve_config(group: click.Group, config: Config) -> ResolvedConfig:
    """Check ``config`` against the group's commands and merge it: default < global table < command table.

    Raises:
        ConfigError: an unknown command table, a key no command (or not this command) has, or a bad value.
    """
    commands = {name: cmd for name, cmd in group.commands.items() if configurable_options(cmd)}
    for name in config.command_settings:
        if name not in commands:
            raise ConfigError(
                f"unknown command table '{name}'",
                path=config.path,
                where=config.where(name),
                fix="commands with settings are: " + ", ".join(sorted(commands)),
            )
    known = {key for cmd in commands.values() for key in configurable_options(cmd)}
    for key in config.global_settings:
        if key not in known:
            raise _unknown_key(key, known, group, config)
    resolved = ResolvedConfig(config)
    global_errors: dict[str, list[ConfigError]] = {}
    for name, cmd in commands.items():
        resolved.settings[name] = _command_settings(name, cmd, config, global_errors)
    for key, errors in global_errors.items():
        # A global value fits some commands and not others (a list for a single-valued --format, a method
        # one command lacks): it applies where it fits. Fitting none is an error.
        users = sum(key in configurable_options(cmd) for cmd in commands.values())
        if len(errors) == users:
            raise errors[0]
    return resolved


def _command_settings(
    name: str, cmd: click.Command, config: Config, global_errors: dict[str, list[ConfigError]]
) -> dict[str, tuple[Any, str]]:
    options = configurable_options(cmd)
    table = config.command_settings.get(name, {})
    for key in table:
        if key not in options:
            raise _unknown_key(key, set(options), cmd, config, name)
    out: dict[str, tuple[Any, str]] = {}
    for key, param in options.items():
        assert param.name is not None
        out[param.name] = (_default(param, cmd), DEFAULT_SOURCE)
        if key in table:
            out[param.name] = (_convert(param, table[key], key, config, name), config.label(name))
        elif key in config.global_settings:
            try:
                value = _convert(param, config.global_settings[key], key, config, None)
            except ConfigError as exc:
                global_errors.setdefault(key, []).append(exc)
                continue
            out[param.name] = (value, config.label())
    return out


def _unknown_key(
    key: str, known: set[str], owner: click.Command, config: Config, command: str | None = None
) -> ConfigError:
    path, where = config.path, config.where(command)
    dashed = key.replace("_", "-")
    if dashed in known:
        return ConfigError(
            f"unknown key '{key}'",
            path=path,
            where=where,
            fix=f"write long option names with dashes: '{dashed}'",
        )
    if key in NOT_CONFIGURABLE or dashed in NOT_CONFIGURABLE or _is_argument(key, owner):
        return ConfigError(
            f"'{key}' cannot be set in a config file",
            path=path,
            where=where,
            fix="give inputs, outputs and --force on the command line",
        )
    import difflib  # on use: only a misspelt setting needs it

    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
    scope = f"'{command}'" if command else "any command"
    return ConfigError(f"unknown key '{key}': not an option of {scope}", path=path, where=where, fix=hint)


def _is_argument(key: str, where: click.Command) -> bool:
    commands = where.commands.values() if isinstance(where, click.Group) else [where]
    return any(isinstance(p, click.Argument) and p.name == key for cmd in commands for p in cmd.params)


def _convert(param: click.Option, value: Any, key: str, config: Config, command: str | None) -> Any:
    where = config.where(command, key)
    if param.multiple:
        values = value if isinstance(value, list) else [value]
        return [_convert_one(param, v, where, config) for v in values]
    if isinstance(value, list):
        raise ConfigError(
            "has the wrong type", path=config.path, where=where, expected="a single value", found="a list"
        )
    return _convert_one(param, value, where, config)


def _convert_one(param: click.Option, value: Any, where: str | None, config: Config) -> Any:
    expected = _expected_types(param)
    # bool is an int in Python; TOML keeps them apart, and so do we (error-kl = true is a mistake).
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise ConfigError(
            "has the wrong type",
            path=config.path,
            where=where,
            expected=" or ".join(_TOML_NAMES[t] for t in expected),
            found=f"{_toml_type(value)} {value!r}",
        )
    if param.is_flag:
        return value
    try:
        converted = param.type.convert(value, param, None)
    except click.BadParameter as exc:
        raise ConfigError(exc.message, path=config.path, where=where) from exc
    if isinstance(param.type, click.Path) and isinstance(converted, Path) and not converted.is_absolute():
        # Paths in a config file are relative to the file, so that the gate reads the same file from any
        # working directory of the repository.
        converted = config.folder() / converted
    return converted


_TOML_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _expected_types(param: click.Option) -> tuple[type, ...]:
    if param.is_flag:
        return (bool,)
    if isinstance(param.type, click.types.FloatParamType):
        return (int, float)
    if isinstance(param.type, click.types.IntParamType):
        return (int,)
    return (str,)


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _default(param: click.Option, cmd: click.Command) -> Any:
    value = param.get_default(click.Context(cmd), call=True)
    if param.multiple:
        return list(value) if isinstance(value, list | tuple) else []
    # Click marks "no default" with a sentinel of its own; show it as unset.
    return value if isinstance(value, str | int | float | Path) else None


def apply_config(ctx: click.Context, explicit: Path | None, no_config: bool) -> None:
    """Load the configuration for this run and install it as the commands' default_map.

    Raises:
        ConfigError: see :func:`resolve_config` and :func:`bnaudit.config.load_config`.
    """
    assert isinstance(ctx.command, click.Group)
    config = Config() if no_config else load_config(explicit)
    resolved = resolve_config(ctx.command, config)
    ctx.meta[META_KEY] = resolved
    ctx.default_map = resolved.default_map()


def _toml_value(value: Any) -> str:
    if value is None:
        return "<unset>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


@click.command("config")
@click.argument("command", required=False)
@click.pass_context
def config_command(ctx: click.Context, command: str | None) -> int:
    """Print the effective settings of every command (or of COMMAND) and where each came from.

    Settings come from --config FILE, else from the nearest bnaudit.toml or pyproject.toml [tool.bnaudit]
    in the working folder or above (up to the repository root). The command line overrides them.
    """
    resolved: ResolvedConfig = ctx.meta[META_KEY]
    if command is not None and command not in resolved.settings:
        raise click.BadParameter(
            f"'{command}' has no settings; choose one of: {', '.join(sorted(resolved.settings))}",
            param_hint="COMMAND",
        )
    source = resolved.config.label() if resolved.config.path else "none found (defaults everywhere)"
    lines = [f"# configuration file: {source}", "# the command line overrides every value below"]
    for name in [command] if command else sorted(resolved.settings):
        assert name is not None
        keys = {p.name: key for key, p in configurable_options(_group(ctx).commands[name]).items()}
        lines += ["", f"[{name}]"]
        settings = resolved.settings[name]
        rows = [(f"{keys[param]} = {_toml_value(v)}", src) for param, (v, src) in settings.items()]
        width = max((len(r[0]) for r in rows), default=0)
        lines += [f"{text.ljust(width)}  # {src}" for text, src in rows]
    click.echo("\n".join(lines))
    return 0


def _group(ctx: click.Context) -> click.Group:
    assert ctx.parent is not None and isinstance(ctx.parent.command, click.Group)
    return ctx.parent.command
