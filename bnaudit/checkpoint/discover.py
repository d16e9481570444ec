"""Find the state dicts inside a checkpoint's rebuilt container, including whole pickled modules."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from bnaudit.checkpoint.types import Placeholder, StateDictRef, TensorRef
from bnaudit.checkpoint.unpickler_globals import summary
from bnaudit.errors import InputError

MAX_DEPTH = 4
# Optimizer and scheduler state holds tensors keyed like parameters ("exp_avg", "step") but is not a model.
_SKIP_KEYS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_states",
        "optimizer_state_dict",
        "optim",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "param_schedulers",
    }
)


def _is_optimizer_state(obj: Mapping[Any, Any]) -> bool:
    return "state" in obj and "param_groups" in obj


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a mapping of string keys to mostly tensors.

    A few non-tensor values are allowed (None, ``*_extra_state``, odd metadata): at least 80% of the other
    values must be tensors, and there must be at least one.

    Args:
        obj: any rebuilt object.

    Returns:
        True for a state dict.
    """
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    tensors = sum(isinstance(v, TensorRef) for v in obj.values())
    others = sum(
        not isinstance(v, TensorRef) and v is not None and not k.endswith("_extra_state")
        for k, v in obj.items()
    )
    return tensors > 0 and others * 4 <= tensors


def _module_state(obj: Any) -> dict[str, Any] | None:
    """The ``__dict__`` of a pickled ``nn.Module`` placeholder, or None when ``obj`` is not one."""
    if not isinstance(obj, Placeholder):
        return None
    state = obj.state
    if isinstance(state, tuple) and state and isinstance(state[0], Mapping):
        state = state[0]
    if isinstance(state, Mapping) and all(k in state for k in ("_parameters", "_buffers", "_modules")):
        return dict(state)
    return None


def module_state_dict(
    obj: Any, prefix: str = "", depth: int = 0, seen: set[int] | None = None
) -> dict[str, TensorRef]:
    """Flatten a pickled module's parameters and persistent buffers the way ``state_dict()`` does.

    Args:
        obj: a Placeholder of an ``nn.Module`` (``torch.save(model)``).
        prefix: key prefix of this module (``layer1.0.``).
        depth: nesting level, bounded to stop hostile module graphs.
        seen: ids of the modules already flattened. A module reached a second time (shared, or a hostile
            graph whose every level names the next one twice, 2**64 paths in a few kB) is not walked again,
            so the walk visits each module once.

    Returns:
        Key -> TensorRef, parameters then buffers then children, like ``nn.Module.state_dict``.
    """
    seen = set() if seen is None else seen
    state = _module_state(obj)
    if state is None or depth > 64 or id(obj) in seen:
        return {}
    seen.add(id(obj))
    result: dict[str, TensorRef] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    skip_names = set(skip.items if isinstance(skip, Placeholder) else skip)
    for group in ("_parameters", "_buffers"):
        for name, value in _named(state[group]):
            if isinstance(value, TensorRef) and not (group == "_buffers" and name in skip_names):
                result[f"{prefix}{name}"] = value
    for name, child in _named(state["_modules"]):
        result.update(module_state_dict(child, f"{prefix}{name}.", depth + 1, seen))
    return result


def _named(members: Any) -> Iterator[tuple[str, Any]]:
    # Module attribute names are strings; a hostile key (a tuple holding itself) is never formatted.
    for name, value in members.items() if isinstance(members, Mapping) else ():
        if isinstance(name, str):
            yield name, value


class _Search:
    """One search's memory: the containers already searched, and what each candidate was found to hold.

    Every object is judged once and every container searched once, however often the pickle's memo shares
    it: the search costs the size of the object graph, not the number of its paths.
    """

    def __init__(self) -> None:
        self.searched: set[int] = set()
        self.found: dict[int, dict[str, TensorRef] | None] = {}

    def tensors(self, obj: Any) -> dict[str, TensorRef] | None:
        """A state dict's (or module's) tensors, or None when ``obj`` is neither."""
        key = id(obj)
        if key not in self.found:
            if is_state_dict(obj):
                self.found[key] = {k: v for k, v in obj.items() if isinstance(v, TensorRef)}
            elif _module_state(obj) is not None:
                self.found[key] = module_state_dict(obj)
            else:
                self.found[key] = None
        return self.found[key]


def _walk(obj: Any, path: tuple[Any, ...], depth: int, search: _Search) -> Iterator[StateDictRef]:
    tensors = search.tensors(obj)
    if tensors is not None:
        if tensors:
            yield StateDictRef("/".join(p if isinstance(p, str) else summary(p) for p in path), path, tensors)
        return
    if depth >= MAX_DEPTH or not isinstance(obj, Mapping | list | tuple) or id(obj) in search.searched:
        return
    search.searched.add(id(obj))
    if isinstance(obj, Mapping):
        if _is_optimizer_state(obj):
            return
        for key, value in obj.items():
            if not (isinstance(key, str) and key in _SKIP_KEYS):
                yield from _walk(value, (*path, key), depth + 1, search)
    else:
        for index, value in enumerate(obj):
            yield from _walk(value, (*path, index), depth + 1, search)


def find_state_dicts(root: Any, source: str = "checkpoint") -> list[StateDictRef]:
    """Every state dict in a rebuilt checkpoint, outermost first.

    Searches the top level, nested mappings and lists (depth up to ``MAX_DEPTH``), never inside a state
    dict already found, never in optimizer or scheduler state; whole pickled modules are flattened. A
    container the pickle shares is searched once, at its first place.

    Args:
        root: ``Checkpoint.root``.
        source: the file, for messages.

    Returns:
        StateDictRefs named by their ``/``-joined key path (``""`` for the top level), in container order.

    Raises:
        InputError: the object graph is too deeply nested to search.
    """
    try:
        return list(_walk(root, (), 0, _Search()))
    except RecursionError:
        raise InputError(
            "object graph is nested too deeply to search", path=source, fix="re-save a plain state dict"
        ) from None


def select_state_dicts(
    found: list[StateDictRef], key: str | None, source: str = "checkpoint"
) -> list[StateDictRef]:
    """Pick the state dict named by ``--key``, or all of them when no key is given.

    Args:
        found: the state dicts of a checkpoint.
        key: a ``/``-joined path name as listed in ``StateDictRef.name``, or None.
        source: the file, for messages.

    Returns:
        ``found`` when ``key`` is None, else a one-element list.

    Raises:
        InputError: no state dict has that name (the message lists the names there are).
    """
    if key is None:
        return list(found)
    for sd in found:
        if sd.name == key:
            return [sd]
    available = ", ".join(repr(sd.name) for sd in found) or "none"
    raise InputError(
        f"no state dict at key {key!r}",
        path=source,
        fix=f"state dicts found: {available} — pass one of them to --key",
    )
