"""Globals judged by how torch.load's unpickler would use them: the opcode that calls them, the attribute
path it walks. Pickles are written opcode by opcode here, so each case holds exactly the construct named."""

from __future__ import annotations

import pytest

from bnaudit.bn.pickle_policy import Safety, global_uses, pickle_findings
from bnaudit.checkpoint.unpickler import CorruptPickleError, inert_load


def text(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def glob(module: str, name: str) -> bytes:
    return text(module) + text(name) + b"\x93"  # STACK_GLOBAL (protocol 4 walks dotted names)


def p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def judged(data: bytes) -> dict[str, Safety]:
    _, refs, _ = inert_load(data, display="t.pt", source="data.pkl")
    return {u.qualname: u.safety for u in global_uses(refs)}


CASES = {
    "reduce": (p4(glob("mypkg.tools", "run") + b")R"), "mypkg.tools.run", Safety.DANGEROUS, "REDUCE"),
    "newobj_build": (p4(glob("mypkg.cfg", "Config") + b")\x81}b"), "mypkg.cfg.Config", Safety.UNKNOWN, ""),
    "newobj_ex": (p4(glob("mypkg.cfg", "Config") + b")}\x92"), "mypkg.cfg.Config", Safety.DANGEROUS, "NEWOBJ_EX"),
    "inst": (b"(imypkg.cfg\nConfig\n.", "mypkg.cfg.Config", Safety.DANGEROUS, "INST"),
    "obj": (p4(b"(" + glob("mypkg.cfg", "Config") + b"o"), "mypkg.cfg.Config", Safety.DANGEROUS, "OBJ"),
    "slot_build": (
        p4(glob("mypkg.cfg", "Config") + b")\x81" + b"N}" + text("x") + b"K\x01s\x86b"),
        "mypkg.cfg.Config",
        Safety.DANGEROUS,
        "BUILD with slot state",
    ),
    "call_of_an_instance": (
        p4(glob("mypkg.cfg", "Config") + b")\x81)R"), "mypkg.cfg.Config", Safety.DANGEROUS, "REDUCE"
    ),
    "reconstructor_base": (
        b"\x80\x02ccopyreg\n_reconstructor\ncmypkg.cfg\nConfig\ncmypkg.base\nBase\nN\x87R.",
        "mypkg.base.Base",
        Safety.DANGEROUS,
        "copyreg._reconstructor",
    ),
    "rebuild_from_type_func": (
        p4(glob("torch._tensor", "_rebuild_from_type_v2") + b"(" + glob("mypkg.tools", "run")
           + glob("torch", "Tensor") + b")}tR"),
        "mypkg.tools.run",
        Safety.DANGEROUS,
        "torch._tensor._rebuild_from_type_v2",
    ),
    "walk_through_a_module": (
        p4(glob("torch.distributed.checkpoint.metadata", "os.system") + b"\x85"),
        "torch.distributed.checkpoint.metadata.os.system",
        Safety.DANGEROUS,
        "",
    ),
    "walk_through_torch": (
        p4(glob("torch.nn.modules.module", "torch.os.system")), "torch.nn.modules.module.torch.os.system",
        Safety.DANGEROUS, "",
    ),
    "nested_class_instantiated": (
        p4(glob("mypkg.cfg", "Outer.Inner") + b")\x81}b"), "mypkg.cfg.Outer.Inner", Safety.UNKNOWN, ""
    ),
    "import_runs_a_program": (p4(glob("pip.__main__", "x")), "pip.__main__.x", Safety.DANGEROUS, ""),
    "deny_list_named_only": (p4(glob("os", "posix_spawn")), "os.posix_spawn", Safety.DANGEROUS, ""),
    "allowlisted_call": (p4(glob("collections", "OrderedDict") + b")R"), "collections.OrderedDict", Safety.SAFE, ""),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_judged_by_use(case):
    data, qualname, safety, call = CASES[case]
    _, refs, _ = inert_load(data, display="t.pt", source="data.pkl")
    ref = next(r for r in refs if r.qualname == qualname)
    assert ref.call == call
    assert judged(data)[qualname] is safety
    findings = pickle_findings(refs, "t.pt")
    named = [f for f in findings if f.tensor == qualname]
    if safety is Safety.DANGEROUS:
        assert named and named[0].kind.value == "unsafe-pickle" and named[0].severity.value == "error"
        assert call in named[0].message
    elif safety is Safety.UNKNOWN:
        assert named[0].severity.value == "warn" and "mypkg.cfg" in named[0].message


def test_fast_path_pickles_are_read_again_to_see_the_calls():
    # A well-formed pickle goes to the C unpickler first; a global off the allowlist sends it back through
    # the tracking one, so the call is still seen.
    data = b"\x80\x04}" + text("k") + glob("mypkg.tools", "run") + b")Rs."
    assert judged(data)["mypkg.tools.run"] is Safety.DANGEROUS


def test_a_global_of_a_broken_pickle_may_have_been_called():
    data = b"\x80\x04" + glob("mypkg.cfg", "Config") + b"\xff"
    with pytest.raises(CorruptPickleError) as caught:
        inert_load(data, display="t.pt", source="data.pkl")
    (ref,) = caught.value.globals
    assert {u.qualname: u.safety for u in global_uses([ref])} == {"mypkg.cfg.Config": Safety.DANGEROUS}
