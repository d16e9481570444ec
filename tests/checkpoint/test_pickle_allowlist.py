"""Every allowlist entry names what its reason says, in the libraries installed here.

Adding an entry means changing ``ALLOWED_COUNT`` below after checking, here, what the entry reaches.
"""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

from bnaudit.checkpoint.pickle_allowlist import ALLOW_GROUPS, STORAGE_NAMES, allowed, denied, import_acts

ALLOWED_COUNT = 267  # every (module, name) pair of ALLOW_GROUPS
# Modules of the list that the test environment need not have.
OPTIONAL = ("pytorch_lightning", "lightning", "numpy.core", "numpy._core", "numpy.dtypes")
ENTRIES = [(g.module, name, g) for g in ALLOW_GROUPS for name in g.names]


def test_every_entry_is_counted_and_has_a_reason():
    assert len(ENTRIES) == ALLOWED_COUNT == len({(m, n) for m, n, _ in ENTRIES})
    assert all(g.reason and len(g.reason) < 110 for g in ALLOW_GROUPS)


def _resolve(module: str, name: str) -> object:
    try:
        obj: object = importlib.import_module(module)
    except ImportError:
        if module.startswith(OPTIONAL):
            pytest.skip(f"{module} is not installed")
        raise
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("module", "name", "group"), ENTRIES, ids=[f"{m}.{n}" for m, n, _ in ENTRIES])
def test_entry_reaches_a_class_or_function_not_a_module(module, name, group):
    import torch

    if module == "torch" and not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    if module.startswith("numpy") and name in ("scalar", "_reconstruct", "_frombuffer"):
        pytest.importorskip(module)
    obj = _resolve(module, name)
    assert not isinstance(obj, types.ModuleType)
    if "torch.nn.modules" in module:
        assert inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
    elif module == "torch" and name.endswith("Tensor") and name != "Tensor":
        assert type(obj).__name__ == "tensortype"  # a legacy tensor type: torch.FloatTensor & co
    elif module == "torch" and name not in ("Tensor", "Size", "device"):
        assert isinstance(obj, torch.dtype | torch.layout | torch.memory_format)
    else:
        assert inspect.isclass(obj) or callable(obj)


def test_storage_names_are_torchs_storage_types():
    import torch

    known = {n for n in dir(torch) if n.endswith("Storage")} | {"_UntypedStorage"}
    assert known >= STORAGE_NAMES
    assert allowed("anything.at.all", "FloatStorage") is not None  # torch.load never imports the module


def test_deny_list_and_import_acts():
    assert denied("os", "posix_spawn") and denied("os.path", "join") and denied("_operator", "attrgetter")
    assert denied("torch.utils.collect_env", "run") and denied("logging.config", "dictConfig")
    assert denied("collections", "OrderedDict") is None and denied("osx", "thing") is None
    assert import_acts("antigravity") and import_acts("pip.__main__") and not import_acts("__main__")
