"""Side-by-side: bnaudit and the peer scanners over the red-team corpus (tests/security/corpus).

The corpus is regenerated, each malicious case is proven to run under torch.load(weights_only=False)
(tests/security/sandbox.py; a case that does not run is left out and listed), then every installed tool
scans every case. Printed and written to benchmarks/results/scanners/: flagged / missed / false positives /
wall time per tool, and a per-class matrix.

    python benchmarks/bench_scanners.py --peers-bin .venv-peers/bin
    python benchmarks/bench_scanners.py --smoke        # bnaudit alone on a few cases (CI)
    python benchmarks/bench_scanners.py --tools bnaudit --keep-others   # rerun bnaudit, keep the peers' rows

``--keep-others`` takes the rows of the tools not rerun from the results already written, provided they
were measured on the same cases (the peers' verdicts do not depend on bnaudit's version).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.scanner_peers import RUNNERS, peer_version  # noqa: E402
from tests.security.corpus import build_corpus  # noqa: E402
from tests.security.sandbox import victim_loads  # noqa: E402

SMOKE_CASES = [
    "codecs.open",
    "legacy:object-pickle",
    "walk:nn.module->torch.os.system",
    "torch.save:zip-default",
]
PACKAGES = {
    "fickling (overtly malicious only)": "fickling",
    "picklescan": "picklescan",
    "modelscan": "modelscan",
    "fickling": "fickling",
    "modelaudit": "modelaudit",
}


def _available(tool: str, bin_dir: Path | None) -> str | None:
    """The tool's version, or None when it is not installed."""
    if tool == "bnaudit":
        from bnaudit import __version__

        return __version__
    return peer_version(bin_dir, PACKAGES[tool])


def _scan(folder: Path, names: list[str] | None, tools: list[str], bin_dir: Path | None) -> dict:
    built = build_corpus(folder, names)
    jobs = [
        {"name": n, "path": str(b.path), "load": b.case.load, "marker": str(b.marker)}
        for n, b in built.items()
    ]
    verdicts = victim_loads(jobs)
    malicious = {n for n, b in built.items() if b.case.malicious and verdicts[n].executed}
    not_running = sorted(n for n, b in built.items() if b.case.malicious and not verdicts[n].executed)
    benign = {n for n, b in built.items() if not b.case.malicious}
    cases = sorted(malicious | benign)
    paths = [built[n].path for n in cases]
    results: dict[str, dict] = {}
    for tool in tools:
        version = _available(tool, bin_dir)
        if version is None:
            continue
        flagged, seconds = RUNNERS[tool](paths, bin_dir)
        per_case = {n: bool(flagged.get(str(built[n].path))) for n in cases}
        results[tool] = {"version": version, "seconds": round(seconds, 1), "flagged": per_case}
    return {
        "cases": {n: {"class": built[n].case.attack_class, "malicious": n in malicious} for n in cases},
        "not_running_under_torch_load": not_running,
        "tools": results,
        "python": platform.python_version(),
    }


def _summary_rows(data: dict) -> list[str]:
    cases = data["cases"]
    bad = [n for n, c in cases.items() if c["malicious"]]
    good = [n for n, c in cases.items() if not c["malicious"]]
    rows = [
        f"| tool | version | flagged (of {len(bad)} executing) | missed "
        f"| false positives (of {len(good)} benign) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for tool, r in data["tools"].items():
        hit = sum(r["flagged"][n] for n in bad)
        fp = sum(r["flagged"][n] for n in good)
        rows.append(f"| {tool} | {r['version']} | {hit} | {len(bad) - hit} | {fp} | {r['seconds']} |")
    return rows


def _class_rows(data: dict) -> list[str]:
    tools = list(data["tools"])
    by_class: dict[str, list[str]] = {}
    for n, c in data["cases"].items():
        by_class.setdefault(c["class"], []).append(n)
    rows = ["| class | cases | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for cls, names in sorted(by_class.items()):
        cells = [str(sum(data["tools"][t]["flagged"][n] for n in names)) for t in tools]
        rows.append(f"| {cls} | {len(names)} | " + " | ".join(cells) + " |")
    return rows


def _case_rows(data: dict) -> list[str]:
    tools = list(data["tools"])
    rows = ["| case | class | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for n, c in data["cases"].items():
        marks = ["flagged" if data["tools"][t]["flagged"][n] else "-" for t in tools]
        rows.append(f"| `{n}` | {c['class']} | " + " | ".join(marks) + " |")
    return rows


def render(data: dict) -> str:
    parts = [
        "## Scanners on the red-team corpus",
        "",
        *_summary_rows(data),
        "",
        "Per class (benign: false positives; others: flagged of the executing cases):",
        "",
        *_class_rows(data),
        "",
        "Per case:",
        "",
        *_case_rows(data),
    ]
    if data["not_running_under_torch_load"]:
        parts += [
            "",
            "Left out (did not run under torch.load): " + ", ".join(data["not_running_under_torch_load"]),
        ]
    return "\n".join(parts) + "\n"


def _with_kept_rows(data: dict, previous_file: Path) -> dict:
    """``data`` with the rows of the tools it lacks taken from ``previous_file`` (same cases only)."""
    previous = json.loads(previous_file.read_text())
    if previous["cases"] != data["cases"]:
        raise SystemExit(f"{previous_file} was measured on other cases: rerun every tool")
    kept = {t: r for t, r in previous["tools"].items() if t not in data["tools"]}
    order = [t for t in previous["tools"] if t in data["tools"] or t in kept]
    order += [t for t in data["tools"] if t not in order]
    tools = {**kept, **data["tools"]}
    return {**data, "tools": {t: tools[t] for t in order}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="bnaudit only, a few cases, results not written")
    parser.add_argument("--peers-bin", type=Path, help="bin/ of the venv holding the peer scanners")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scanners")
    parser.add_argument("--tools", nargs="+", choices=list(RUNNERS), help="the tools to run (default: all)")
    parser.add_argument("--keep-others", action="store_true", help="keep the other tools' written rows")
    args = parser.parse_args()
    tools = ["bnaudit"] if args.smoke else (args.tools or list(RUNNERS))
    with tempfile.TemporaryDirectory(prefix="bnaudit-redteam-") as tmp:
        data = _scan(Path(tmp), SMOKE_CASES if args.smoke else None, tools, args.peers_bin)
    if args.keep_others and not args.smoke:
        data = _with_kept_rows(data, args.out / "scanners.json")
    text = render(data)
    print(text)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scanners.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "scanners.md").write_text(text)


if __name__ == "__main__":
    main()
