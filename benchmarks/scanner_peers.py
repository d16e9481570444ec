"""How each scanner is run over the corpus and what counts as "flagged" for it (its own gate's answer).

- bnaudit: ``bnaudit inspect PATH`` exits 1.
- picklescan: ``picklescan -p PATH`` exits 1 (dangerous globals found).
- modelscan: ``modelscan -p PATH`` exits 1 (issues found).
- fickling: its Python API, ``fickling.loader.scan_file`` / ``scan_zip_archive`` (every file of a folder;
  its CLI reads only bare pickles): severity above LIKELY_SAFE; a second row counts only
  LIKELY_OVERTLY_MALICIOUS and above.
- modelaudit: one ``modelaudit scan -f json`` over every path; flagged when a ``critical`` issue is
  located in the path (warnings, which it gives every torch file, do not count).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
Paths = list[Path]
Outcome = tuple[dict[str, bool], float]

_FICKLING = r"""
import json, os, sys, zipfile
from fickling.loader import scan_file, scan_zip_archive
def severity(path):
    if zipfile.is_zipfile(path):
        return max((r.severity.value[0] for r in scan_zip_archive(path, graceful=True).values()), default=0)
    return scan_file(path, graceful=True).severity.value[0]
out = {}
for path in sys.argv[1:]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    worst = 0
    for f in files:
        try:
            worst = max(worst, severity(f))
        except Exception:
            pass
    out[path] = worst
print(json.dumps(out))
"""


def _quiet_env() -> dict[str, str]:
    env = {**os.environ, "PROMPTFOO_DISABLE_TELEMETRY": "1", "NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _per_path(argv: Callable[[Path], list[str]], paths: Paths, flagged_codes: tuple[int, ...]) -> Outcome:
    start, result = time.perf_counter(), {}
    for path in paths:
        done = subprocess.run(argv(path), capture_output=True, env=_quiet_env(), timeout=300)
        result[str(path)] = done.returncode in flagged_codes
    return result, time.perf_counter() - start


def run_bnaudit(paths: Paths, _bin: Path | None) -> Outcome:
    return _per_path(lambda p: [sys.executable, "-m", "bnaudit", "-q", "inspect", str(p)], paths, (1,))


def run_picklescan(paths: Paths, bin_dir: Path | None) -> Outcome:
    return _per_path(lambda p: [_tool(bin_dir, "picklescan"), "-p", str(p)], paths, (1,))


def run_modelscan(paths: Paths, bin_dir: Path | None) -> Outcome:
    return _per_path(lambda p: [_tool(bin_dir, "modelscan"), "-p", str(p)], paths, (1,))


def run_fickling(paths: Paths, bin_dir: Path | None) -> Outcome:
    """Fickling's own gate: any severity above LIKELY_SAFE (what ``is_likely_safe`` answers)."""
    return _fickling(paths, bin_dir, 1)


def run_fickling_overt(paths: Paths, bin_dir: Path | None) -> Outcome:
    """Fickling counting only LIKELY_OVERTLY_MALICIOUS and above: its default gate flags every torch file
    (a torch import is a non-standard import), this row shows what it says without that rule."""
    return _fickling(paths, bin_dir, 4)


def _fickling(paths: Paths, bin_dir: Path | None, threshold: int) -> Outcome:
    start = time.perf_counter()
    python = str(bin_dir / "python") if bin_dir else sys.executable
    done = subprocess.run(
        [python, "-c", _FICKLING, *map(str, paths)], capture_output=True, text=True, timeout=1200
    )
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    return {p: w >= threshold for p, w in worst.items()}, time.perf_counter() - start


def run_modelaudit(paths: Paths, bin_dir: Path | None) -> Outcome:
    start = time.perf_counter()
    argv = [_tool(bin_dir, "modelaudit"), "scan", "--no-cache", "-f", "json", *map(str, paths)]
    done = subprocess.run(argv, capture_output=True, text=True, env=_quiet_env(), timeout=3600)
    issues = json.loads(done.stdout)["issues"]
    result = {}
    for path in paths:
        prefix = str(path)
        result[prefix] = any(
            i.get("severity") == "critical" and str(i.get("location") or "").startswith(prefix)
            for i in issues
        )
    return result, time.perf_counter() - start


def _tool(bin_dir: Path | None, name: str) -> str:
    found = bin_dir / name if bin_dir and (bin_dir / name).exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(name)
    return str(found)


def peer_version(bin_dir: Path | None, package: str) -> str | None:
    python = str(bin_dir / "python") if bin_dir else sys.executable
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


RUNNERS: dict[str, Callable[[Paths, Path | None], Outcome]] = {
    "bnaudit": run_bnaudit,
    "picklescan": run_picklescan,
    "modelscan": run_modelscan,
    "fickling": run_fickling,
    "fickling (overtly malicious only)": run_fickling_overt,
    "modelaudit": run_modelaudit,
}
