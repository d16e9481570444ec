"""Classify the globals a checkpoint's pickle references: what ``torch.load`` would import and call."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from bnaudit.checkpoint.types import GlobalRef
from bnaudit.report.model import Finding, FindingKind, Severity


class Safety(str, Enum):
    """How a referenced global is judged.

    ``safe``: tensor machinery and plain containers (``torch.load(weights_only=True)`` accepts them).
    ``benign``: well-known data classes that run no user code (argparse.Namespace, NumPy scalars...).
    ``unknown``: any other class or function: ``weights_only=True`` refuses the file, and
    ``weights_only=False`` imports that module and calls it.
    ``dangerous``: callables that run commands, evaluate code, open files or import modules.
    """

    SAFE = "safe"
    BENIGN = "benign"
    UNKNOWN = "unknown"
    DANGEROUS = "dangerous"


# One place for the lists (README "Security classification" documents them). Entries are "module.name";
# "module.*" covers a whole module and its submodules.
SAFE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "builtins.dict", "builtins.list", "builtins.set", "builtins.frozenset", "builtins.tuple",
        "builtins.int", "builtins.float", "builtins.complex", "builtins.bool", "builtins.str",
        "builtins.bytes", "builtins.bytearray", "builtins.slice",
        "_codecs.encode",
        "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2", "torch.Tensor", "torch.nn.parameter.Parameter",
        "torch.Size", "torch.device", "torch.serialization._get_layout",
    }
)  # fmt: skip
# torch.distributed.checkpoint's own metadata classes: every DCP .metadata pickle is made of them.
SAFE_MODULES = (
    "torch.distributed.checkpoint.metadata.*",
    "torch.distributed.checkpoint.planner.*",
    "torch.distributed.checkpoint.filesystem.*",
)
SAFE_PATTERNS = (
    "torch.*Storage",
    "torch.float*",
    "torch.bfloat16",
    "torch.int*",
    "torch.uint*",
    "torch.bool",
    "torch.complex*",
)
BENIGN_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "numpy.dtype", "numpy.ndarray",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
        "lightning.fabric.utilities.data.AttributeDict", "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "collections.defaultdict", "collections.Counter", "collections.deque",
        "datetime.datetime", "datetime.date", "datetime.timedelta", "datetime.timezone",
        "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path",
        "copyreg._reconstructor", "builtins.object", "builtins.range",
        "torch.nn.modules.*", "torch.ao.nn.*", "torch.optim.*",
        "torch._utils._rebuild_qtensor", "torch._utils._rebuild_sparse_tensor",
        "numpy.dtypes.*", "enum.Enum", "types.SimpleNamespace",
    }
)  # fmt: skip
DANGEROUS_GLOBALS = frozenset(
    {
        "os.system", "os.popen", "os.execv", "os.execve", "os.execl", "os.execlp", "os.execvp", "os.spawnv",
        "os.spawnl", "os.spawnlp", "os.spawnvp", "os.fork", "os.kill", "os.remove", "os.unlink", "os.rmdir",
        "os.rename", "os.open", "os.write", "os.putenv", "os.startfile",
        "posix.*", "nt.*", "subprocess.*", "runpy.*", "importlib.*", "code.*", "codeop.*", "pty.*",
        "shutil.*",
        "socket.*", "webbrowser.*", "ctypes.*", "multiprocessing.*", "asyncio.*", "sys.*", "marshal.*",
        "pickle.*", "_pickle.*", "dill.*", "cloudpickle.*", "joblib.*", "ssl.*", "urllib.*",
        "types.FunctionType", "types.CodeType", "types.MethodType",
        "http.*", "requests.*", "tempfile.*", "io.open", "_io.*", "fcntl.*",
        "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__", "builtins.getattr",
        "builtins.setattr", "builtins.delattr", "builtins.open", "builtins.input", "builtins.breakpoint",
        "builtins.globals", "builtins.locals", "builtins.vars", "builtins.apply", "builtins.execfile",
        "builtins.memoryview", "builtins.help", "builtins.exit", "builtins.quit",
        "functools.partial", "functools.reduce", "operator.attrgetter", "operator.methodcaller",
        "operator.itemgetter", "operator.call",
        "torch.load", "torch.serialization.load", "torch.hub.*", "torch.jit.*", "torch._C.*",
        "torch.ops.*", "torch.package.*", "numpy.load", "numpy.testing.*", "numpy.lib.*",
        "pydoc.*", "pdb.*", "timeit.*", "cProfile.*", "profile.*", "trace.*", "distutils.*", "setuptools.*",
        "pip.*", "venv.*", "ensurepip.*", "zipimport.*", "pkgutil.*", "site.*",
    }
)  # fmt: skip


_WILDCARDS = frozenset("*?[")


@functools.cache
def _index(
    entries: frozenset[str] | tuple[str, ...],
) -> tuple[frozenset[str], frozenset[str], re.Pattern[str]]:
    """``entries`` as plain names, ``module.*`` modules and one regex of the other patterns, built once."""
    modules = frozenset(e[:-2] for e in entries if e.endswith(".*"))
    plain = frozenset(e for e in entries if not e.endswith(".*") and _WILDCARDS.isdisjoint(e))
    patterns = [
        fnmatch.translate(e) for e in entries if not e.endswith(".*") and not _WILDCARDS.isdisjoint(e)
    ]
    return plain, modules, re.compile("|".join(patterns) if patterns else "(?!)")


def _matches(qualname: str, entries: frozenset[str] | tuple[str, ...]) -> bool:
    # Set lookups, not a scan of every entry: a hostile pickle can name hundreds of thousands of globals.
    plain, modules, patterns = _index(entries)
    if qualname in plain:
        return True
    dot = qualname.find(".")
    while dot >= 0:  # "module.*" covers qualname when a prefix up to one of its dots is that module
        if qualname[:dot] in modules:
            return True
        dot = qualname.find(".", dot + 1)
    return patterns.match(qualname) is not None


@functools.lru_cache(maxsize=4096)  # every rank of a job references the same few globals
def classify_global(module: str, name: str) -> Safety:
    """Judge one ``module.name`` referenced by a pickle (Python-2 names already normalised by the reader)."""
    qualname = f"{module}.{name}"
    if _matches(qualname, DANGEROUS_GLOBALS):
        return Safety.DANGEROUS
    if qualname in SAFE_GLOBALS or _matches(qualname, SAFE_PATTERNS) or _matches(qualname, SAFE_MODULES):
        return Safety.SAFE
    if _matches(qualname, BENIGN_GLOBALS):
        return Safety.BENIGN
    return Safety.UNKNOWN


@dataclass(frozen=True)
class GlobalUse:
    """A distinct global of one file with its classification and the pickles that reference it."""

    qualname: str
    safety: Safety
    sources: tuple[str, ...]


def global_uses(refs: Iterable[GlobalRef]) -> list[GlobalUse]:
    """Group references by global, classified, most dangerous first."""
    sources: dict[str, list[str]] = {}
    parts: dict[str, tuple[str, str]] = {}
    for ref in refs:
        qualname = ref.qualname
        seen = sources.get(qualname)
        if seen is None:
            seen = sources[qualname] = []
            parts[qualname] = (ref.module, ref.name)
        if ref.source not in seen:
            seen.append(ref.source)
    order = {Safety.DANGEROUS: 0, Safety.UNKNOWN: 1, Safety.BENIGN: 2, Safety.SAFE: 3}
    uses = [GlobalUse(q, classify_global(*parts[q]), tuple(s)) for q, s in sources.items()]
    return sorted(uses, key=lambda u: (order[u.safety], u.qualname))


# Unknown and benign globals listed as findings per file; the rest are counted in one finding.
MAX_LISTED_GLOBALS = 100
# What a global of each judgement makes of a file: the finding's severity, kind and message.
_PICKLE_FINDINGS = {
    Safety.DANGEROUS: (
        Severity.ERROR,
        FindingKind.UNSAFE_PICKLE,
        "the pickle references '{name}', which torch.load(weights_only=False) would call: loading this file "
        "runs code. bnaudit read it inertly; do not torch.load it, and re-save the weights from a trusted "
        "source",
    ),
    Safety.UNKNOWN: (
        Severity.WARN,
        FindingKind.SUSPICIOUS_PICKLE,
        "the pickle references '{name}': torch.load(weights_only=True) refuses the file and "
        "weights_only=False would import and run that module; save plain data (state dicts, dicts of "
        "numbers) to make it loadable safely",
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
                Finding(severity, kind, message.format(name=use.qualname), file=file, tensor=use.qualname)
            )
    for safety, count in listed.items():
        if safety is not Safety.DANGEROUS and count > MAX_LISTED_GLOBALS:
            severity, kind, _ = _PICKLE_FINDINGS[safety]
            more = count - MAX_LISTED_GLOBALS
            text = f"the pickle references {more} more {safety.value} globals (the first "
            text += f"{MAX_LISTED_GLOBALS} are listed)"
            out.append(Finding(severity, kind, text, file=file))
    return out
