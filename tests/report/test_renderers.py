"""Every renderer on a Report built by hand, compared with the exact text it must produce."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from bnaudit import __version__
from bnaudit.report import OutputFormat, render
from bnaudit.report.model import FailOn, Finding, FindingKind, InputInfo, LayerRow, Report, Severity
from bnaudit.report.sections import AverageOutcome, Column, Command
from tests.report.hand_made import hand_made_report


@pytest.fixture(autouse=True)
def outside_any_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # github and sarif name files relative to the repository root, else to the working folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("secrets.token_hex", lambda _: "t0k3n")


TABLE = """\
bnaudit compare: 2 ranks, 2 BatchNorm layer(s), reference r0.pt

layer    status    max KL    max shift    rank
-------  --------  --------  -----------  ------
fc_bn    error     0.2500    1.5000       1
stem.bn  warn      0.0300    2.00e-04     0

Findings:
  ERROR divergence         [model] layer 'fc_bn': KL 0.25 on rank 1
  WARN  divergence         [model] layer 'stem.bn': KL 0.03 on rank 0 (accepted by the baseline)

FAIL: 1 error(s), 1 warning(s), 1 note(s), 1 accepted by the baseline (fail-on: error)
Next: bnaudit average r0.pt r1.pt -o fixed.pt
"""


def test_table() -> None:
    assert render(hand_made_report(), OutputFormat.TABLE, FailOn.ERROR) == TABLE


def _average_report() -> Report:
    rows = (
        LayerRow("fc_bn", "model", Severity.OK, 4, {"max_kl_before": 0.5}, 1, 2),
        LayerRow("bn", "ema", Severity.OK, 4, {"max_kl_before": 0.0}),
    )
    findings = (
        Finding(Severity.WARN, FindingKind.COUNTER_MISMATCH, "counters differ", state_dict="model"),
        Finding(Severity.INFO, FindingKind.NEVER_UPDATED, "a note"),
    )
    return Report(
        Command.AVERAGE,
        (InputInfo("r0.pt", "torch-zip", 0), InputInfo("r1.pt", "torch-zip", 1)),
        {"ranks": 2, "method": "pooled", "reference": "r0.pt"},
        rows,
        findings,
        columns=(Column("worst rank", attribute="worst_rank"), Column("KL before", "max_kl_before")),
        average=AverageOutcome("out.pt", "out.pt.bnaudit.json", None, None, None, ()),
    )


AVERAGE_TABLE = """\
bnaudit average: 2 ranks, 2 BatchNorm layer(s), method pooled, reference r0.pt

layer    state dict    worst rank    KL before
-------  ------------  ------------  -----------
fc_bn    model         1             0.5000
bn       ema           -             0.0000

Findings:
  WARN  counter-mismatch   counters differ

Wrote out.pt (provenance: out.pt.bnaudit.json)
FAIL: 0 error(s), 1 warning(s), 1 note(s) (fail-on: warn)
"""


def test_table_of_a_repair_has_no_status_column_and_says_what_was_written() -> None:
    assert render(_average_report(), OutputFormat.TABLE, FailOn.WARN) == AVERAGE_TABLE


JSON = """\
{
  "schema_version": 1,
  "tool": {"name": "bnaudit", "version": "<version>"},
  "command": "compare",
  "verdict": "fail",
  "fail_on": "error",
  "summary": {"layers": 2, "error": 1, "warn": 1, "info": 1, "baselined": 1},
  "headline": "max_kl",
  "settings": {"ranks": 2, "warn_kl": 0.02},
  "inputs": [
    {"path": "r0.pt", "format": "torch-zip", "rank": 0, "state_dicts": ["model"]},
    {"path": "r1.pt", "format": "torch-zip", "rank": 1, "state_dicts": ["model"]}
  ],
  "layers": [
    {"name": "fc_bn", "state_dict": "model", "severity": "error", "channels": 4, \
"metrics": {"max_kl": 0.25, "max_shift": 1.5}, "worst_rank": 1, "worst_channel": 3},
    {"name": "stem.bn", "state_dict": "model", "severity": "warn", "channels": 8, \
"metrics": {"max_kl": 0.03, "max_shift": 0.0002}, "worst_rank": 0, "worst_channel": 5}
  ],
  "findings": [
    {"severity": "error", "kind": "divergence", "message": "layer 'fc_bn': KL 0.25 on rank 1", "file": null, \
"state_dict": "model", "layer": "fc_bn", "tensor": null, "rank": 1, "channel": 3, "baselined": false},
    {"severity": "warn", "kind": "divergence", "message": "layer 'stem.bn': KL 0.03 on rank 0", "file": "r1.pt", \
"state_dict": "model", "layer": "stem.bn", "tensor": null, "rank": 0, "channel": 5, "baselined": true},
    {"severity": "info", "kind": "counter-mismatch", "message": "num_batches_tracked differs", "file": null, \
"state_dict": null, "layer": null, "tensor": "n", "rank": null, "channel": null, "baselined": false}
  ],
  "next_step": "bnaudit average r0.pt r1.pt -o fixed.pt",
  "warnings": [
    "r1.pt: saved in bfloat16"
  ],
  "baseline": {"path": "b.json", "accepted": 1}
}
"""


def test_json() -> None:
    expected = JSON.replace("<version>", __version__)
    assert render(hand_made_report(), OutputFormat.JSON, FailOn.ERROR) == expected


MARKDOWN = """\
## ❌ bnaudit compare: FAIL

**1 error(s), 1 warning(s), 1 note(s), 1 accepted by the baseline** · fail-on: `error` · 2 BatchNorm layer(s) \
· 2 checkpoint(s)

| layer | state dict | status | max KL | max shift | rank |
|---|---|---|---:|---:|---:|
| `fc_bn` | `model` | error | 0.2500 | 1.5000 | 1 |
| `stem.bn` | `model` | warn | 0.0300 | 2.00e-04 | 0 |

### Findings

| severity | kind | where | message |
|---|---|---|---|
| error | `divergence` | `model:fc_bn` | layer 'fc\\_bn': KL 0.25 on rank 1 |
| warn | `divergence` | `model:stem.bn` | layer 'stem.bn': KL 0.03 on rank 0 (accepted by the baseline) |
| info | `counter-mismatch` | `n` | num\\_batches\\_tracked differs |

**Next:** `bnaudit average r0.pt r1.pt -o fixed.pt`
"""


def test_markdown() -> None:
    assert render(hand_made_report(), OutputFormat.MARKDOWN, FailOn.ERROR) == MARKDOWN


GITHUB = (
    "::error file=r0.pt,title=bnaudit divergence in model%3Afc_bn::layer 'fc_bn': KL 0.25 on rank 1\n"
    "::notice file=r1.pt,title=bnaudit divergence in model%3Astem.bn (accepted by the baseline)::"
    "layer 'stem.bn': KL 0.03 on rank 0\n"
    "::notice file=r0.pt,title=bnaudit counter-mismatch in n::num_batches_tracked differs\n"
    "::group::bnaudit compare report\n"
    "::stop-commands::t0k3n\n" + TABLE.rstrip("\n") + "\n::t0k3n::\n"
    "::endgroup::\n"
    "FAIL: 1 error(s), 1 warning(s), 1 note(s), 1 accepted by the baseline (fail-on: error)\n"
    "Next: bnaudit average r0.pt r1.pt -o fixed.pt\n"
)


def test_github() -> None:
    assert render(hand_made_report(), OutputFormat.GITHUB, FailOn.ERROR) == GITHUB


JUNIT = """\
<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="bnaudit compare" tests="3" failures="1" errors="0">
  <testsuite name="model" tests="2" failures="1" errors="0" skipped="0">
    <properties>
      <property name="fail_on" value="error" />
      <property name="verdict" value="fail" />
    </properties>
    <testcase name="fc_bn" classname="bnaudit.compare.model" time="0">
      <failure message="layer 'fc_bn': KL 0.25 on rank 1" type="divergence">\
error: divergence: layer 'fc_bn': KL 0.25 on rank 1</failure>
      <system-out>4 channel(s), status error; max_kl=0.2500, max_shift=1.5000; worst rank 1, channel 3</system-out>
    </testcase>
    <testcase name="stem.bn" classname="bnaudit.compare.model" time="0">
      <system-out>8 channel(s), status warn; max_kl=0.0300, max_shift=2.00e-04; worst rank 0, channel 5
warn: divergence: layer 'stem.bn': KL 0.03 on rank 0 (accepted by the baseline)</system-out>
    </testcase>
  </testsuite>
  <testsuite name="&lt;root&gt;" tests="1" failures="0" errors="0" skipped="0">
    <properties>
      <property name="fail_on" value="error" />
      <property name="verdict" value="fail" />
    </properties>
    <testcase name="counter-mismatch: n" classname="bnaudit.compare.&lt;root&gt;" time="0">
      <system-out>info: counter-mismatch: num_batches_tracked differs</system-out>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_junit() -> None:
    assert render(hand_made_report(), OutputFormat.JUNIT, FailOn.ERROR) == JUNIT


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _sarif_result(index: int, level: str, text: str, where: tuple[str | None, ...], file: str) -> dict:
    state_dict, layer, tensor, rank, channel = where
    kind = "divergence" if index == 0 else "counter-mismatch"
    name = f"{state_dict}:{layer}" if state_dict else str(tensor)
    return {
        "ruleId": kind,
        "ruleIndex": index,
        "level": level,
        "message": {"text": text},
        "partialFingerprints": {
            "bnauditFinding/v1": _fingerprint(f"{kind}|{state_dict or ''}|{layer or tensor}|{rank}")
        },
        "properties": {
            "stateDict": state_dict,
            "layer": layer,
            "tensor": tensor,
            "rank": rank,
            "channel": channel,
        },
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": file, "uriBaseId": "%SRCROOT%"},
                    "region": {"startLine": 1},
                },
                "logicalLocations": [{"fullyQualifiedName": name, "kind": "member"}],
            }
        ],
        "baselineState": "new",
    }


def _expected_sarif() -> dict:
    accepted = _sarif_result(
        0, "warning", "layer 'stem.bn': KL 0.03 on rank 0", ("model", "stem.bn", None, 0, 5), "r1.pt"
    )
    accepted["baselineState"] = "unchanged"
    accepted["suppressions"] = [{"kind": "external", "justification": "accepted by the bnaudit baseline"}]
    driver = {
        "name": "bnaudit",
        "version": __version__,
        "semanticVersion": __version__,
        "informationUri": "https://pypi.org/project/bnaudit/",
        "rules": "<rules>",
    }
    run = {
        "tool": {"driver": driver},
        "automationDetails": {"id": "bnaudit/compare/"},
        "invocations": [{"executionSuccessful": True}],
        "results": [
            _sarif_result(
                0, "error", "layer 'fc_bn': KL 0.25 on rank 1", ("model", "fc_bn", None, 1, 3), "r0.pt"
            ),
            accepted,
            _sarif_result(2, "note", "num_batches_tracked differs", (None, None, "n", None, None), "r0.pt"),
        ],
        "properties": {"command": "compare", "verdict": "fail", "failOn": "error"},
    }
    return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0", "runs": [run]}


def test_sarif() -> None:
    text = render(hand_made_report(), OutputFormat.SARIF, FailOn.ERROR)
    # The rule catalogue (a rule per finding kind) is checked by test_formats; here it is cut out.
    rules = re.search(r'"rules": (\[\n.*?\n {10}\])', text, re.DOTALL)
    assert rules is not None
    ids = [rule["id"] for rule in json.loads(rules.group(1))]
    assert ids[:3] == ["divergence", "weights-differ", "counter-mismatch"] and len(ids) == len(FindingKind)
    cut = text[: rules.start(1)] + '"<rules>"' + text[rules.end(1) :]
    assert cut == json.dumps(_expected_sarif(), indent=2) + "\n"
