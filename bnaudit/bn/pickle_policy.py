"""Judge the globals a checkpoint's pickle references by what ``torch.load`` would do with them.

The rule (README "Security classification"): a global is inert only when it is on the allowlist
(:mod:`bnaudit.checkpoint.pickle_allowlist`), resolved as torch.load resolves it: the module, then the
attribute path walked name by name. Then:

- named on the allowlist: ``safe`` (tensor machinery) or ``benign`` (known data classes, an info note);
- called at load time (REDUCE, INST, OBJ, NEWOBJ_EX, BUILD with slot state, copyreg's reconstructor, a
  tensor subclass rebuild) and not on the allowlist: ``dangerous``, an ``unsafe-pickle`` error;
- an attribute path that walks through a module (``torch.os.system``), a module whose import runs a
  program, a name on the deny list, or any global of a pickle that breaks before its use is known:
  ``dangerous`` too;
- otherwise only instantiated (NEWOBJ and a plain BUILD) or named: ``unknown``, a ``suspicious-pickle``
  warning naming the module torch.load would import.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from bnaudit.checkpoint.pickle_allowlist import Inertness, allowed, denied, import_acts
from bnaudit.checkpoint.types import GlobalRef
from bnaudit.checkpoint.unpickler_calls import USE_UNKNOWN
from bnaudit.report.model import Finding, FindingKind, Severity


class Safety(str, Enum):
    """How a referenced global is judged (see the module docstring)."""

    SAFE = "safe"
    BENIGN = "benign"
    UNKNOWN = "unknown"
    DANGEROUS = "dangerous"


@dataclass(frozen=True)
class Judgement:
    """A global's safety and, for the dangerous and unknown ones, why, in words."""

    safety: Safety
    why: str = ""


def _walks_through_module(name: str) -> bool:
    # Protocol 4 resolves "a.b.c" as getattr(getattr(getattr(module, a), b), c). A path through nested
    # classes names classes (capitalised) before its last part; any other part is most likely a module
    # the named one imported (torch.os, metadata.os), from which the walk can reach any function.
    parts = name.split(".")
    return any(not part[:1].isupper() for part in parts[:-1])


@functools.lru_cache(maxsize=4096)  # every rank of a job references the same few globals
def judge_global(module: str, name: str, call: str) -> Judgement:
    """Judge ``module`` + attribute path ``name``, used as ``call`` says ("" when never called)."""
    group = allowed(module, name)
    if "." in name and _walks_through_module(name):
        return Judgement(
            Safety.DANGEROUS,
            f"torch.load resolves it by walking the attribute path '{name}' from module '{module}', "
            "through another module, so it can reach any function",
        )
    if group is not None:
        return Judgement(Safety.SAFE if group.inertness is Inertness.SAFE else Safety.BENIGN)
    if import_acts(module):
        return Judgement(
            Safety.DANGEROUS, f"torch.load imports module '{module}', whose import runs a program"
        )
    reason = denied(module, name)
    if reason is not None:
        return Judgement(Safety.DANGEROUS, f"it is on bnaudit's deny list (globals that {reason})")
    if call == USE_UNKNOWN:
        return Judgement(
            Safety.DANGEROUS, "the pickle breaks before it shows how it is used; torch.load may call it"
        )
    if call:
        return Judgement(
            Safety.DANGEROUS, f"torch.load would call it ({call}) and it is not on the allowlist"
        )
    return Judgement(
        Safety.UNKNOWN, f"torch.load(weights_only=False) would import module '{module}' and build the object"
    )


def classify_global(module: str, name: str, call: str = "") -> Safety:
    """The :class:`Safety` of one global (Python-2 names already normalised by the reader)."""
    return judge_global(module, name, call).safety


@dataclass(frozen=True)
class GlobalUse:
    """A distinct global of one file with its judgement and the pickles that reference it."""

    qualname: str
    safety: Safety
    sources: tuple[str, ...]
    why: str = ""


def global_uses(refs: Iterable[GlobalRef]) -> list[GlobalUse]:
    """Group references by global, judged, most dangerous first."""
    sources: dict[str, list[str]] = {}
    first: dict[str, GlobalRef] = {}
    for ref in refs:
        qualname = ref.qualname
        seen = sources.get(qualname)
        if seen is None:
            seen = sources[qualname] = []
            first[qualname] = ref
        elif ref.call and not first[qualname].call:
            first[qualname] = ref  # the same global called from another pickle: judge the call
        if ref.source not in seen:
            seen.append(ref.source)
    order = {Safety.DANGEROUS: 0, Safety.UNKNOWN: 1, Safety.BENIGN: 2, Safety.SAFE: 3}
    uses = []
    for qualname, ref in first.items():
        judged = judge_global(ref.module, ref.name, ref.call)
        uses.append(GlobalUse(qualname, judged.safety, tuple(sources[qualname]), judged.why))
    return sorted(uses, key=lambda u: (order[u.safety], u.qualname))


# Unknown and benign globals listed as findings per file; the rest are counted in one finding.
MAX_LISTED_GLOBALS = 100
# What a global of each judgement makes of a file: the finding's severity, kind and message.
_PICKLE_FINDINGS = {
    Safety.DANGEROUS: (
        Severity.ERROR,
        FindingKind.UNSAFE_PICKLE,
        "the pickle references '{name}': {why}. Loading this file with torch.load(weights_only=False) can "
        "run code; bnaudit read it inertly. Do not torch.load it, and re-save the weights from a trusted "
        "source",
    ),
    Safety.UNKNOWN: (
        Severity.WARN,
        FindingKind.SUSPICIOUS_PICKLE,
        "the pickle references '{name}', which is not on bnaudit's allowlist: {why} (it is not called); "
        "torch.load(weights_only=True) refuses the file. Save plain data (state dicts, dicts of numbers) "
        "to make it loadable safely",
    ),
    Safety.BENIGN: (
        Severity.INFO,
        FindingKind.SUSPICIOUS_PICKLE,
        "the pickle references '{name}', a known data class (no code of the file runs, but "
        "torch.load(weights_only=True) may refuse it)",
    ),
}


def pickle_findings(refs: Iterable[GlobalRef], file: str) -> list[Finding]:
    """Findings for the globals a file's pickles reference (safe machinery produces none).

    Dangerous callables are ``unsafe-pickle`` errors, unknown classes ``suspicious-pickle`` warnings and
    known-benign classes ``suspicious-pickle`` notes (info). Nothing was executed to find them.
    """
    out = []
    listed: dict[Safety, int] = {}
    for use in global_uses(refs):
        judged = _PICKLE_FINDINGS.get(use.safety)
        if judged is None:
            continue
        severity, kind, message = judged
        listed[use.safety] = listed.get(use.safety, 0) + 1
        # Every dangerous global is a finding; unknown and benign ones are listed up to a cap, then
        # counted: a hostile pickle naming 300,000 classes makes one finding, not 300,000.
        if use.safety is Safety.DANGEROUS or listed[use.safety] <= MAX_LISTED_GLOBALS:
            out.append(
                Finding(
                    severity,
                    kind,
                    message.format(name=use.qualname, why=use.why),
                    file=file,
                    tensor=use.qualname,
                )
            )
    for safety, count in listed.items():
        if safety is not Safety.DANGEROUS and count > MAX_LISTED_GLOBALS:
            severity, kind, _ = _PICKLE_FINDINGS[safety]
            more = count - MAX_LISTED_GLOBALS
            text = f"the pickle references {more} more {safety.value} globals (the first "
            text += f"{MAX_LISTED_GLOBALS} are listed)"
            out.append(Finding(severity, kind, text, file=file))
    return out
