"""Names resolved as torch.load resolves them: under protocol 4 ``find_class`` walks a dotted name through
module attributes, so a harmless-looking module can lead to ``os.system``; memo tricks hide which strings
STACK_GLOBAL really consumes."""

from __future__ import annotations

from pathlib import Path

from tests.security.corpus.carriers import splice, torch_zip_with
from tests.security.corpus.dcp_helpers import save_dcp
from tests.security.corpus.ops import (
    POP,
    STACK_GLOBAL,
    call,
    dct,
    glob,
    lst,
    stack_glob,
    system_call,
    text,
    touch_command,
    tup,
)
from tests.security.corpus.registry import case

SYSTEM = ("os.system", "posix.system")


def _walk_to_system() -> bytes:
    return stack_glob("torch.distributed.checkpoint.metadata", "os.system")


@case("walk:dcp.metadata->os.system", "resolution", SYSTEM)
def _walk_metadata(folder: Path, m: str) -> Path:
    return torch_zip_with(folder / "walk-metadata.pt", system_call(m, _walk_to_system()), protocol=4)


@case("walk:nn.module->torch.os.system", "resolution", SYSTEM)
def _walk_torch_os(folder: Path, m: str) -> Path:
    func = stack_glob("torch.nn.modules.module", "torch.os.system")
    return torch_zip_with(folder / "walk-torch-os.pt", system_call(m, func), protocol=4)


@case("walk:copyreg._reconstructor->Popen", "resolution", ("subprocess.Popen", "copyreg._reconstructor"))
def _walk_reconstructor(folder: Path, m: str) -> Path:
    popen = stack_glob("torch.utils.cpp_extension", "subprocess.Popen")
    payload = call(glob("copyreg", "_reconstructor"), popen, popen, lst(text("/usr/bin/touch"), text(m)))
    return torch_zip_with(folder / "walk-reconstructor.pt", payload, protocol=4)


@case("walk:_rebuild_from_type_v2->os.system", "resolution", SYSTEM)
def _walk_rebuild(folder: Path, m: str) -> Path:
    args = (_walk_to_system(), glob("torch", "Tensor"), tup(text(touch_command(m))), dct())
    payload = call(glob("torch._tensor", "_rebuild_from_type_v2"), *args)
    return torch_zip_with(folder / "walk-rebuild.pt", payload, protocol=4)


@case("walk:dcp-.metadata->os.system", "resolution", SYSTEM, load="dcp")
def _walk_dcp_metadata(folder: Path, m: str) -> Path:
    path = save_dcp(folder / "walk-dcp")
    meta = path / ".metadata"
    meta.write_bytes(splice(meta.read_bytes(), system_call(m, _walk_to_system())))
    return path


@case("memo:BINPUT+MEMOIZE-confusion", "resolution", SYSTEM)
def _memo_confusion(folder: Path, m: str) -> Path:
    # Explicit BINPUT 0/1 hold "os"/"system"; the MEMOIZEs that follow land at 2 and 3, not at 0 and 1 as a
    # scanner counting only MEMOIZE assumes, so BINGET 0/1 fetch the dangerous pair.
    strings = text("os") + b"q\x00" + POP + text("system") + b"q\x01" + POP
    decoys = text("torch._utils") + b"\x94" + POP + text("_rebuild_tensor_v2") + b"\x94" + POP
    func = strings + decoys + b"h\x00h\x01" + STACK_GLOBAL
    return _with_fresh_memo(folder / "memo-confusion.pt", system_call(m, func))


@case("memo:popped-decoy-strings", "resolution", SYSTEM)
def _popped_decoy(folder: Path, m: str) -> Path:
    # The two strings right before STACK_GLOBAL are popped decoys; the real pair comes from the memo.
    stored = text("posix") + b"q\x00" + POP + text("system") + b"q\x01" + POP
    decoys = text("torch._utils") + text("_rebuild_tensor_v2") + POP + POP
    func = stored + decoys + b"h\x00h\x01" + STACK_GLOBAL
    return _with_fresh_memo(folder / "popped-decoy.pt", system_call(m, func))


def _with_fresh_memo(path: Path, payload: bytes) -> Path:
    """The payload before a protocol-2 data.pkl: its BINPUTs name their slots, so the payload's memo
    entries are simply overwritten after it ran and the checkpoint still loads."""
    return torch_zip_with(path, payload, protocol=2)
