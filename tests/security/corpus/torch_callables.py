"""Callables inside torch, NumPy and aiohttp that run code, a shell or a nested pickle when called."""

from __future__ import annotations

from pathlib import Path

from tests.security.corpus.callable_case import attr, in_zip
from tests.security.corpus.carriers import torch_zip_with
from tests.security.corpus.ops import (
    call,
    dct,
    glob,
    raw_bytes,
    system_call,
    text,
    touch_command,
    touch_source,
    whole,
)
from tests.security.corpus.registry import case


@in_zip("torch.utils.collect_env.run", ("torch.utils.collect_env.run",))
def _collect_env(m: str) -> bytes:
    return call(glob("torch.utils.collect_env", "run"), text(touch_command(m)))


@in_zip("torch.jit.execWrapper", ("torch.jit.unsupported_tensor_ops.execWrapper",))
def _exec_wrapper(m: str) -> bytes:
    return call(glob("torch.jit.unsupported_tensor_ops", "execWrapper"), text(touch_source(m)), dct(), dct())


@in_zip("torch.fx._forward_from_src", ("torch.fx.graph_module._forward_from_src",))
def _fx(m: str) -> bytes:
    return call(glob("torch.fx.graph_module", "_forward_from_src"), text(touch_source(m)), dct())


@in_zip("numpy.f2py._eval_scalar", ("numpy.f2py.crackfortran._eval_scalar",))
def _f2py(m: str) -> bytes:
    return call(glob("numpy.f2py.crackfortran", "_eval_scalar"), text(touch_source(m)), dct())


@in_zip("aiohttp-module", ("aiohttp.helpers",), requires=("aiohttp",))
def _aiohttp(m: str) -> bytes:
    # aiohttp re-exports os at module level: the network library reaches os.system by an attribute walk.
    return system_call(m, attr(glob("aiohttp.helpers", "os"), "system"))


@in_zip("torch.datapipes.basichandlers-nested", ("torch.utils.data.datapipes.utils.decoder.basichandlers",))
def _basichandlers(m: str) -> bytes:
    nested = raw_bytes(whole(system_call(m), protocol=2))
    return call(glob("torch.utils.data.datapipes.utils.decoder", "basichandlers"), text("pickle"), nested)


@case("torch._inductor._reload_python_module", "callable", ("torch._inductor.runtime.compile_tasks",))
def _inductor(folder: Path, m: str) -> Path:
    # Inductor's cache loader execs a Python file: here a companion file next to the checkpoint.
    source = folder / "kernel.py"
    source.write_text(touch_source(m) + "\n")
    func = glob("torch._inductor.runtime.compile_tasks", "_reload_python_module")
    return torch_zip_with(folder / "inductor.pt", call(func, text("k"), text(str(source))))
