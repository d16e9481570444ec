"""The red-team corpus: every case proven to execute under torch.load must be flagged by inspect, compare
and average (exit 1, the global named, nothing written, input unchanged, no traceback); benign files
written by real libraries must get no pickle finding.

Hostile *resource* cases (memory, time, FIFOs) live in tests/checkpoint/test_ckpt_hostile_resources.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import call_main
from tests.security.conftest import Proven
from tests.security.corpus import CASES, available

PICKLE_KINDS = {"unsafe-pickle", "suspicious-pickle", "ambiguous-archive"}
MALICIOUS = [n for n, c in CASES.items() if c.malicious]
BENIGN = [n for n, c in CASES.items() if not c.malicious]


def _param(name: str) -> object:
    marks = []
    if not available(CASES[name]):
        marks.append(pytest.mark.skip(reason=f"needs {', '.join(CASES[name].requires)}"))
    return pytest.param(name, marks=marks, id=name)


def _digest(path: Path) -> str:
    """The bytes of a file, or of a folder's files with their relative names."""
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _names_global(text: str, name: str) -> bool:
    return any(e in text for e in CASES[name].expect)


def _flagged(out: str, err: str, name: str) -> bool:
    """An error finding naming the global in the JSON report, or, when the pickle also turned out malformed
    (no report), the ``unsafe-pickle`` message naming it on stderr's first line (SECURITY.md)."""
    kinds = {"unsafe-pickle", "ambiguous-archive"} if CASES[name].structure else {"unsafe-pickle"}
    findings = json.loads(out)["findings"] if out.strip() else []
    if any(
        f["severity"] == "error"
        and f["kind"] in kinds
        and (f["kind"] == "ambiguous-archive" or _names_global(f"{f['tensor']} {f['message']}", name))
        for f in findings
    ):
        return True
    first = err.strip().splitlines()[0] if err.strip() else ""
    return "unsafe-pickle" in first and _names_global(first, name)


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


@pytest.mark.parametrize("name", MALICIOUS)
def test_case_executes_under_torch_load(corpus: dict[str, Proven], name: str) -> None:
    if name not in corpus:
        pytest.skip(f"needs {', '.join(CASES[name].requires)}")
    assert corpus[name].verdict.executed, (
        f"{name}: the payload did not run under torch.load; fix the generator"
    )


@pytest.mark.parametrize("name", [_param(n) for n in MALICIOUS])
def test_every_command_flags_the_case(
    corpus: dict[str, Proven], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = corpus[name].built
    before = _digest(built.path)
    code, out, err = call_main(capsys, "inspect", str(built.path), "--format", "json")
    assert "Traceback" not in err and code != 3, err
    assert code == 1, f"inspect exit {code}: {err}"
    assert _flagged(out, err, name), out + err
    ranks = [_copy(built.path, tmp_path / f"r{r}_{built.path.name}") for r in (0, 1)]
    code, out, err = call_main(capsys, "compare", *map(str, ranks), "--format", "json")
    assert "Traceback" not in err and code == 1, f"compare exit {code}: {err}"
    assert _flagged(out, err, name), out + err
    target = tmp_path / "out" / "averaged.pt"
    target.parent.mkdir()
    code, out, err = call_main(capsys, "average", *map(str, ranks), "-o", str(target))
    assert "Traceback" not in err and code == 1, f"average exit {code}: {err}"
    assert list(target.parent.iterdir()) == [], "average wrote an output"
    assert _digest(built.path) == before and all(_digest(r) == before for r in ranks)
    assert not built.marker.exists(), "bnaudit executed the payload"


@pytest.mark.parametrize("name", [_param(n) for n in BENIGN])
def test_benign_file_passes(corpus: dict[str, Proven], name: str, capsys: pytest.CaptureFixture[str]) -> None:
    proven = corpus[name]
    assert not proven.verdict.load_error and not proven.verdict.executed, "not a file torch.load reads"
    code, out, err = call_main(capsys, "inspect", str(proven.built.path), "--format", "json")
    findings = json.loads(out)["findings"] if out else []
    pickle = [f for f in findings if f["kind"] in PICKLE_KINDS and f["severity"] in ("error", "warn")]
    assert pickle == [], pickle
    assert code == 0, f"exit {code}: {err}\n{out}"
