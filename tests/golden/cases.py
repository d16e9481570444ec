"""The command lines whose reports must stay byte-identical across refactors, and how to run them.

Each case runs ``python -m bnaudit`` from the repository root (paths in reports are relative to it). Files a
case writes go to a temporary folder whose path is replaced by ``<out>`` in the captured text, and the
provenance sidecar's ``created`` time by ``<time>`` and the GitHub format's random stop-commands token by
``<token>``; nothing else is normalised.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "outputs"
FORMATS = ("table", "json", "markdown", "junit", "sarif", "github")
SCENARIOS = ("ddp_sync", "ddp_nosync_shuffled", "ddp_nosync_sorted")
MODEL = ("--model", "fixtures.digits:build_model", "--data", "fixtures.digits:calibration_data", "--quiet")


@dataclass(frozen=True)
class Case:
    """One command line; ``name`` is the golden file's stem."""

    name: str
    args: tuple[str, ...]
    needs_torch: bool = False


def _ranks(scenario: str, suffix: str = "pt") -> str:
    stem = "ckpt" if suffix == "pt" else "model"
    return f"fixtures/{scenario}/{stem}_rank*.{suffix}"


def _cases() -> list[Case]:
    cases: list[Case] = []
    for scenario in SCENARIOS:
        rank0 = f"fixtures/{scenario}/ckpt_rank0.pt"
        for fmt in FORMATS:
            cases.append(Case(f"compare-{scenario}-{fmt}", ("compare", _ranks(scenario), "--format", fmt)))
            cases.append(Case(f"inspect-{scenario}-{fmt}", ("inspect", rank0, "--format", fmt)))
            cases.append(
                Case(f"average-{scenario}-{fmt}", ("average", _ranks(scenario), "--dry-run", "--format", fmt))
            )
        cases.append(Case(f"compare-{scenario}-safetensors", ("compare", _ranks(scenario, "safetensors"))))
        cases.append(Case(f"compare-{scenario}-layer", ("compare", _ranks(scenario), "--layer", "fc_bn")))
        cases.append(Case(f"inspect-{scenario}-security", ("inspect", rank0, "--security")))
        cases.append(Case(f"inspect-{scenario}-layer", ("inspect", rank0, "--layer", "block1.bn")))
        cases.append(
            Case(f"average-{scenario}-mean", ("average", _ranks(scenario), "--dry-run", "--method", "mean"))
        )
        cases.append(
            Case(f"average-{scenario}-write", ("average", _ranks(scenario), "-o", "<out>/averaged.pt"))
        )
    sorted0 = "fixtures/ddp_nosync_sorted/ckpt_rank0.pt"
    for fmt in ("table", "json", "sarif"):
        cases.append(Case(f"drift-sorted-{fmt}", ("drift", sorted0, *MODEL, "--format", fmt), True))
        cases.append(
            Case(
                f"recalibrate-sorted-{fmt}",
                ("recalibrate", sorted0, *MODEL, "-o", "<out>/fixed.pt", "--format", fmt),
                True,
            )
        )
    cases.append(Case("recalibrate-sorted-dry-run", ("recalibrate", sorted0, *MODEL, "--dry-run"), True))
    cases.append(
        Case(
            "recalibrate-sorted-batch-mean",
            ("recalibrate", sorted0, *MODEL, "--dry-run", "--method", "batch-mean"),
            True,
        )
    )
    for fmt in FORMATS:
        cases.append(
            Case(
                f"diff-{fmt}",
                (
                    "diff",
                    "fixtures/ddp_sync/ckpt_rank0.pt",
                    "fixtures/ddp_nosync_sorted/ckpt_rank0.pt",
                    "--frozen",
                    "block1.*",
                    "--format",
                    fmt,
                ),
            )
        )
    cases.append(Case("inspect-safetensors", ("inspect", "fixtures/ddp_sync/model_rank0.safetensors")))
    cases.append(Case("config", ("config",)))
    return cases


CASES = _cases()
_CREATED = re.compile(r'"created": "[^"]*"')
_TOKEN = re.compile(r"^::(stop-commands::)?[0-9a-f]{32}(::)?$", re.MULTILINE)


def run_case(case: Case, out_dir: Path) -> str:
    """Run ``case`` and return its exit code, stdout, stderr and written files as one normalised text."""
    args = [a.replace("<out>", str(out_dir)) for a in case.args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "110", "OMP_NUM_THREADS": "1"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bnaudit", "--no-config", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stdout = _TOKEN.sub(lambda m: f"::{m.group(1) or ''}<token>{m.group(2) or ''}", proc.stdout)
    parts = [f"exit {proc.returncode}", "--- stdout", stdout, "--- stderr", proc.stderr]
    for path in sorted(out_dir.iterdir()):
        if path.suffix == ".json":
            parts += [f"--- file {path.name}", _CREATED.sub('"created": "<time>"', path.read_text())]
        else:
            parts += [f"--- file {path.name}: {path.stat().st_size} bytes"]
    return "\n".join(parts).replace(str(out_dir), "<out>")
