"""Callables that are not on a deny-list but run code, start processes or write files when called.

Each case is a real torch.save checkpoint whose data.pkl calls the callable before rebuilding the state
dict; every payload only creates the marker file.
"""

from __future__ import annotations

import marshal
from collections.abc import Callable
from pathlib import Path

from tests.security.corpus.carriers import torch_zip_with
from tests.security.corpus.ops import (
    TRUE,
    call,
    dct,
    glob,
    integer,
    lst,
    raw_bytes,
    stack_glob,
    system_call,
    text,
    touch_command,
    touch_source,
    whole,
)
from tests.security.corpus.registry import case

TOUCH = "/usr/bin/touch"
Payload = Callable[[str], bytes]


def _in_zip(name: str, expect: tuple[str, ...], protocol: int = 2) -> Callable[[Payload], Payload]:
    """Register ``payload(marker)`` spliced into a torch zip's data.pkl as case ``name``."""

    def register(payload: Payload) -> Payload:
        def build(folder: Path, marker: str) -> Path:
            return torch_zip_with(folder / f"{name}.pt", payload(marker), protocol)

        case(name, "callable", expect)(build)
        return payload

    return register


def _attr(obj: bytes, attribute: str) -> bytes:
    """``operator.attrgetter(attribute)(obj)``."""
    return call(call(glob("_operator", "attrgetter"), text(attribute)), obj)


@_in_zip("os.spawnve", ("os.spawnve", "posix.spawnve"))
def _spawnve(m: str) -> bytes:
    return call(glob("os", "spawnve"), integer(0), text(TOUCH), lst(text("touch"), text(m)), dct())


@_in_zip("os.posix_spawn", ("os.posix_spawn", "posix.posix_spawn"))
def _posix_spawn(m: str) -> bytes:
    return call(glob("os", "posix_spawn"), text(TOUCH), lst(text("touch"), text(m)), dct())


@_in_zip("doctest.debug_script", ("doctest.debug_script",))
def _debug_script(m: str) -> bytes:
    return call(glob("doctest", "debug_script"), text(touch_source(m)), TRUE)  # pm=True: a plain exec


@_in_zip("logging.config.dictConfig-factory", ("logging.config.dictConfig",))
def _dict_config(m: str) -> bytes:
    factory = dct(**{"()": text("builtins.open"), "file": text(m), "mode": text("w")})
    return call(glob("logging.config", "dictConfig"), dct(version=integer(1), filters=dct(f=factory)))


@_in_zip("codecs.open", ("codecs.open",))
def _codecs_open(m: str) -> bytes:
    return call(glob("codecs", "open"), text(m), text("w"))


@_in_zip("io.FileIO", ("io.FileIO", "_io.FileIO"))
def _file_io(m: str) -> bytes:
    return call(glob("io", "FileIO"), text(m), text("w"))


@_in_zip("_operator.attrgetter", ("_operator.attrgetter", "torch.serialization.os"))
def _attrgetter(m: str) -> bytes:
    return system_call(m, _attr(glob("torch.serialization", "os"), "system"))


@_in_zip("_functools.partial", ("_functools.partial", "io.FileIO"))
def _partial(m: str) -> bytes:
    return call(call(glob("_functools", "partial"), glob("io", "FileIO"), text(m), text("w")))


@_in_zip("_frozen_importlib.__import__", ("_frozen_importlib.__import__",))
def _frozen_import(m: str) -> bytes:
    return system_call(m, _attr(call(glob("_frozen_importlib", "__import__"), text("os")), "system"))


@_in_zip("pkgutil.resolve_name", ("pkgutil.resolve_name",))
def _resolve_name(m: str) -> bytes:
    return system_call(m, call(glob("pkgutil", "resolve_name"), text("os:system")))


@_in_zip("torch.utils.collect_env.run", ("torch.utils.collect_env.run",))
def _collect_env(m: str) -> bytes:
    return call(glob("torch.utils.collect_env", "run"), text(touch_command(m)))


@_in_zip("torch.jit.execWrapper", ("torch.jit.unsupported_tensor_ops.execWrapper",))
def _exec_wrapper(m: str) -> bytes:
    return call(glob("torch.jit.unsupported_tensor_ops", "execWrapper"), text(touch_source(m)), dct(), dct())


@_in_zip("torch.fx._forward_from_src", ("torch.fx.graph_module._forward_from_src",))
def _fx(m: str) -> bytes:
    return call(glob("torch.fx.graph_module", "_forward_from_src"), text(touch_source(m)), dct())


@_in_zip("idlelib.calltip.get_entity", ("idlelib.calltip.get_entity",))
def _idlelib(m: str) -> bytes:
    return call(glob("idlelib.calltip", "get_entity"), text(touch_source(m)))


@_in_zip("lib2to3.Grammar.loads", ("lib2to3.pgen2.grammar.Grammar.loads",), protocol=4)
def _lib2to3(m: str) -> bytes:
    grammar = call(glob("lib2to3.pgen2.grammar", "Grammar"))
    nested = raw_bytes(whole(system_call(m)))
    return call(stack_glob("lib2to3.pgen2.grammar", "Grammar.loads"), grammar, nested)


@_in_zip("bdb.Bdb.run", ("bdb.Bdb.run", "bdb.Bdb"), protocol=4)
def _bdb(m: str) -> bytes:
    return call(stack_glob("bdb", "Bdb.run"), call(glob("bdb", "Bdb")), text(touch_source(m)))


@_in_zip("cProfile.runctx", ("cProfile.runctx",))
def _cprofile(m: str) -> bytes:
    return call(glob("cProfile", "runctx"), text(touch_source(m)), dct(), dct())


@_in_zip("distutils.file_util.write_file", ("distutils.file_util.write_file",))
def _write_file(m: str) -> bytes:
    return call(glob("distutils.file_util", "write_file"), text(m), lst(text("x")))


@_in_zip("shutil.copyfile", ("shutil.copyfile",))
def _copyfile(m: str) -> bytes:
    return call(glob("shutil", "copyfile"), text("/dev/null"), text(m))


@_in_zip("numpy.f2py._eval_scalar", ("numpy.f2py.crackfortran._eval_scalar",))
def _f2py(m: str) -> bytes:
    return call(glob("numpy.f2py.crackfortran", "_eval_scalar"), text(touch_source(m)), dct())


@_in_zip("marshal.loads+FunctionType", ("marshal.loads", "types.FunctionType"))
def _marshal(m: str) -> bytes:
    code = marshal.dumps(compile(touch_source(m), "<payload>", "exec"))
    function = call(glob("types", "FunctionType"), call(glob("marshal", "loads"), raw_bytes(code)), dct())
    return call(function)


@_in_zip("_pickle.loads-nested", ("_pickle.loads",), protocol=3)
def _nested(m: str) -> bytes:
    return call(glob("_pickle", "loads"), raw_bytes(whole(system_call(m))))


@_in_zip("aiohttp-module", ("aiohttp.helpers",))
def _aiohttp(m: str) -> bytes:
    # aiohttp re-exports os at module level: the network library reaches os.system by an attribute walk.
    return system_call(m, _attr(glob("aiohttp.helpers", "os"), "system"))
