"""Import user code named by ``--model`` / ``--data`` / ``--forward`` / ``--eval`` specs (trusted code)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception raised by user code, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    # rpartition keeps Windows drive letters ("C:\\x\\m.py:fn") in the module part.
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise UsageError(
            "must look like 'package.module:callable' or 'path/to/file.py:callable'",
            where=f"{what} spec '{spec}'",
        )
    return module, attr


def _import_file(path_text: str, what: str, spec: str) -> Any:
    path = Path(path_text)
    where = f"{what} spec '{spec}'"
    if not path.is_file():
        raise InputError(f"file '{path}' does not exist", where=where)
    # A stable, unique module name lets pickling (DataLoader workers) and repeated imports find the module.
    name = "bnaudit_user_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"'{path}' cannot be imported as a Python file", where=where)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # Imports next to the file ("from helpers import x") work as they do when the file is run as a script.
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise InputError(f"importing '{path}' raised {one_line(exc)}", where=where) from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(name: str, what: str, spec: str) -> Any:
    where = f"{what} spec '{spec}'"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise InputError(
                f"no module named '{exc.name}'", where=where, fix="is it installed, or on PYTHONPATH?"
            ) from None
        raise InputError(f"importing '{name}' raised {one_line(exc)}", where=where) from None
    except Exception as exc:
        raise InputError(f"importing '{name}' raised {one_line(exc)}", where=where) from None


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import the callable named by a ``package.module:attr`` or ``path/to/file.py:attr`` spec.

    User code is trusted by definition: importing it runs it.

    Args:
        spec: the spec; ``attr`` may be dotted (``module:Class.factory``).
        what: the option the spec came from (``--model``), used in error messages.

    Returns:
        The callable.

    Raises:
        UsageError: the spec has no ``:`` part.
        InputError: the module or file is missing, importing it raised, the attribute is missing or not
            callable.
    """
    module_part, attr = _split_spec(spec, what)
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _import_file(module_part, what, spec)
    else:
        module = _import_module(module_part, what, spec)
    obj: Any = module
    where = f"{what} spec '{spec}'"
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = ", ".join(n for n in sorted(dir(obj)) if not n.startswith("_"))[:200]
            raise InputError(
                f"'{module_part}' has no attribute '{attr}' (available: {available})", where=where
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"'{attr}' is a {type(obj).__name__}, not a callable", where=where)
    found: Callable[..., Any] = obj
    return found


def parse_kv(pairs: Sequence[str], option: str) -> dict[str, Any]:
    """Parse repeated ``key=value`` options into keyword arguments.

    Values are JSON when they parse as JSON (``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``, ``"x"``),
    otherwise the raw string (``resnet18``). A later key overrides an earlier one.

    Args:
        pairs: the option values as given.
        option: the option's name (``--model-arg``), for error messages.

    Returns:
        A dict of keyword arguments.

    Raises:
        UsageError: an item has no ``=`` or an empty key.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError("must look like key=value", where=f"{option} '{pair}'")
        if not key.isidentifier():
            raise UsageError(f"'{key}' is not a valid keyword argument name", where=f"{option} '{pair}'")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def call_spec(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, spec: str) -> Any:
    """Call user code ``fn(**kwargs)``; a TypeError (bad arguments) is a UsageError, anything else an
    InputError, both naming the spec."""
    try:
        return fn(**kwargs)
    except TypeError as exc:
        raise UsageError(f"calling it raised {one_line(exc)}", where=f"{what} spec '{spec}'") from None
    except Exception as exc:
        raise InputError(f"calling it raised {one_line(exc)}", where=f"{what} spec '{spec}'") from None


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build the model named by a ``--model`` spec.

    Args:
        spec: ``package.module:callable`` or ``file.py:callable``; an ``nn.Module`` class works too.
        kwargs: keyword arguments from ``--model-arg``.

    Returns:
        The model (in whatever mode and on whatever device the callable left it).

    Raises:
        UsageError, InputError: the spec cannot be imported or called, or it did not return an ``nn.Module``.
    """
    import torch

    model = call_spec(load_callable(spec, "--model"), kwargs or {}, "--model", spec)
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"returned a {type(model).__name__}, expected a torch.nn.Module", where=f"--model spec '{spec}'"
        )
    return model


def load_forward(spec: str) -> Callable[[Any, Any], Any]:
    """Import a ``--forward`` spec: a ``callable(model, batch)`` that runs the model on one batch.

    Raises:
        UsageError, InputError: as :func:`load_callable`.
    """
    return load_callable(spec, "--forward")
