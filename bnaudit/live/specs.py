"""Import user code named by ``--model`` / ``--data`` / ``--forward`` specs; batch tensor files of inputs."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    # rpartition keeps Windows drive letters ("C:\\x\\m.py:fn") in the module part.
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise UsageError(
            f"{what} spec '{spec}' must look like 'package.module:callable' or 'path/to/file.py:callable'"
        )
    return module, attr


def _import_file(path_text: str, what: str, spec: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"{what} spec '{spec}': file '{path}' does not exist")
    # A stable, unique module name lets pickling (DataLoader workers) and repeated imports find the module.
    name = "bnaudit_user_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{what} spec '{spec}': '{path}' cannot be imported as a Python file")
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
        raise InputError(f"{what} spec '{spec}': importing '{path}' raised {_one_line(exc)}") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(name: str, what: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise InputError(
                f"{what} spec '{spec}': no module named '{exc.name}' (is it installed, or on PYTHONPATH?)"
            ) from None
        raise InputError(f"{what} spec '{spec}': importing '{name}' raised {_one_line(exc)}") from None
    except Exception as exc:
        raise InputError(f"{what} spec '{spec}': importing '{name}' raised {_one_line(exc)}") from None


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
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = ", ".join(n for n in sorted(dir(obj)) if not n.startswith("_"))[:200]
            raise InputError(
                f"{what} spec '{spec}': '{module_part}' has no attribute '{attr}' (available: {available})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{what} spec '{spec}': '{attr}' is a {type(obj).__name__}, not a callable")
    return obj


def parse_kv(pairs: Sequence[str], option: str) -> dict[str, Any]:
    """Parse repeated ``key=value`` options into keyword arguments.

    Values are JSON when they parse as JSON (``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``, ``"x"``),
    otherwise
    the raw string (``resnet18``). A later key overrides an earlier one.

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
            raise UsageError(f"{option} '{pair}' must look like key=value")
        if not key.isidentifier():
            raise UsageError(f"{option} '{pair}': '{key}' is not a valid keyword argument name")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _call(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, spec: str) -> Any:
    try:
        return fn(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{what} spec '{spec}': calling it raised {_one_line(exc)}") from None
    except Exception as exc:
        raise InputError(f"{what} spec '{spec}': calling it raised {_one_line(exc)}") from None


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

    model = _call(load_callable(spec, "--model"), kwargs or {}, "--model", spec)
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"--model spec '{spec}' returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


@dataclass
class BatchSource:
    """The batches named by a ``--data`` spec.

    Attributes:
        batches: an iterable of batches (a DataLoader, a list, :class:`TensorFileBatches`, ...).
        sharded: True when the loader was built with ``rank`` / ``world_size`` and yields only this rank's
            batches (rank r's k-th batch is taken to be batch r + k * world_size of the single-process run).
        description: a short text for logs (``data.py:make_loader`` or ``inputs.npy (1000 samples)``).
    """

    batches: Iterable[Any]
    sharded: bool
    description: str


class TensorFileBatches:
    """A tensor of inputs cut in order into batches of ``batch_size`` rows (the last one may be short)."""

    def __init__(self, data: torch.Tensor, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.data) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.data), self.batch_size):
            yield self.data[start : start + self.batch_size]


def _pick_tensor(found: Mapping[str, Any], path: Path) -> Any:
    if "inputs" in found:
        return found["inputs"]
    if len(found) == 1:
        return next(iter(found.values()))
    keys = ", ".join(sorted(map(str, found)))[:200]
    raise InputError(f"{path}: holds several tensors ({keys}); name the inputs 'inputs' or keep one tensor")


def load_tensor_file(path: str | Path) -> torch.Tensor:
    """Read a tensor of inputs from ``.pt``/``.pth`` (``weights_only``), ``.safetensors`` or ``.npy``.

    A file holding a dict must hold one tensor or an ``inputs`` key.

    Raises:
        InputError: the file is missing, unreadable, or holds no single input tensor.
    """
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--data file '{p}' does not exist")
    try:
        if p.suffix == ".npy":
            value: Any = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix == ".safetensors":
            from safetensors.torch import load_file

            value = _pick_tensor(load_file(str(p)), p)
        else:
            value = torch.load(p, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"--data file '{p}' cannot be read: {_one_line(exc)}") from None
    if isinstance(value, Mapping):
        value = _pick_tensor(value, p)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"--data file '{p}' holds a {type(value).__name__}, expected a tensor of inputs")
    if value.dim() == 0:
        raise InputError(f"--data file '{p}' holds a scalar, expected a tensor of inputs (samples first)")
    return value


def _accepts_sharding(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rank" in params and "world_size" in params


def build_batches(
    spec: str,
    kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> BatchSource:
    """Build the calibration batches named by a ``--data`` spec.

    Args:
        spec: a tensor file (``.pt``, ``.pth``, ``.safetensors``, ``.npy``) or a callable spec returning any
            iterable of batches.
        kwargs: keyword arguments from ``--data-arg`` (callables only).
        batch_size: rows per batch for a tensor file (required then); ignored for callables unless the
            callable takes a ``batch_size`` argument that ``kwargs`` does not already set.
        rank, world_size: this process's place in a distributed run; passed to a callable that accepts both
            ``rank`` and ``world_size`` keyword arguments when ``world_size > 1``, which marks the loader as
            already sharded.

    Returns:
        A :class:`BatchSource`.

    Raises:
        UsageError: a tensor file without a positive ``batch_size``, or ``--data-arg`` with a tensor file.
        InputError: the file or callable cannot be read, imported or called.
    """
    kwargs = dict(kwargs or {})
    if spec.lower().endswith(TENSOR_FILE_SUFFIXES) and ":" not in Path(spec).name:
        if kwargs:
            raise UsageError(f"--data-arg given but --data '{spec}' is a tensor file, not a callable")
        if batch_size is None or batch_size <= 0:
            raise UsageError(f"--data '{spec}' is a tensor file: give --batch-size N (a positive integer)")
        data = load_tensor_file(spec)
        return BatchSource(TensorFileBatches(data, batch_size), False, f"{spec} ({len(data)} samples)")
    fn = load_callable(spec, "--data")
    sharded = world_size is not None and world_size > 1 and _accepts_sharding(fn)
    if sharded:
        kwargs.update(rank=rank, world_size=world_size)
    if batch_size is not None and "batch_size" not in kwargs and _has_param(fn, "batch_size"):
        kwargs["batch_size"] = batch_size
    batches = _call(fn, kwargs, "--data", spec)
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise InputError(
            f"--data spec '{spec}' returned a {type(batches).__name__}, expected an iterable of batches"
        )
    return BatchSource(batches, sharded, spec)


def _has_param(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_forward(spec: str) -> Callable[[Any, Any], Any]:
    """Import a ``--forward`` spec: a ``callable(model, batch)`` that runs the model on one batch.

    Raises:
        UsageError, InputError: as :func:`load_callable`.
    """
    return load_callable(spec, "--forward")


def _describe(batch: Any) -> str:
    return type(batch).__name__


def batch_input(batch: Any, input_index: int = 0, input_key: str | None = None) -> Any:
    """The model input inside one batch.

    Args:
        batch: a tensor (the input itself), a tuple/list (input at ``input_index``) or a dict (input at
            ``input_key``).
        input_index: position of the input in a tuple/list batch (``--input-index``).
        input_key: key of the input in a dict batch (``--input-key``).

    Returns:
        The input to call the model with.

    Raises:
        UsageError: a dict batch without ``input_key``, a missing key or index, or a batch of another type.
    """
    import torch

    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        keys = ", ".join(map(str, batch.keys()))[:200]
        if input_key is None:
            raise UsageError(f"batches are dicts (keys: {keys}); name the input with --input-key")
        if input_key not in batch:
            raise UsageError(f"--input-key '{input_key}' is not in the batch (keys: {keys})")
        return batch[input_key]
    if isinstance(batch, tuple | list):
        if not -len(batch) <= input_index < len(batch):
            raise UsageError(f"--input-index {input_index} is out of range for batches of {len(batch)} items")
        return batch[input_index]
    raise UsageError(
        f"batches are of type {_describe(batch)}; bnaudit takes tensors, tuples/lists and dicts — "
        "name a callable(model, batch) with --forward for anything else"
    )
