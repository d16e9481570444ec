"""Option bundles: a group of Click options that reaches the command as one frozen dataclass.

A command with many options keeps a short signature: ``@option_bundle(ModelOptions, "model", OPTIONS)``
adds the options, and the command function receives ``model=ModelOptions(...)`` built from their values
instead of one parameter per option. Each option's parameter name must be a field of the dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def option_bundle(bundle: type[Any], keyword: str, options: Sequence[Callable[[F], F]]) -> Callable[[F], F]:
    """Add ``options`` to a command and pass their values to it as one ``bundle`` instance.

    Args:
        bundle: a dataclass whose fields are the options' parameter names (fields the options do not set
            keep their defaults).
        keyword: the command function's parameter that receives the instance.
        options: ``click.option(...)`` decorators, in the order ``--help`` lists them.

    Returns:
        A decorator for the command function (put it below ``@click.command``).
    """
    names = tuple(f.name for f in dataclasses.fields(bundle))

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def with_bundle(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names if name in kwargs}
            return command(*args, **{keyword: bundle(**values)}, **kwargs)

        decorated: Any = with_bundle
        before = len(getattr(decorated, "__click_params__", []))
        for option in reversed(options):
            decorated = option(decorated)
        added = decorated.__click_params__[before:]
        # A misspelt option name would otherwise reach the command as a stray keyword at run time.
        # Options that never reach the command (expose_value=False) need no field.
        stray = [param.name for param in added if param.expose_value and param.name not in names]
        if stray:
            raise TypeError(f"options {stray} are not fields of {bundle.__name__}")
        return decorated  # type: ignore[no-any-return,unused-ignore]

    return decorate
