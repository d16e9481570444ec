"""Every report format: structure (XML parsed, SARIF and JSON validated), passing and failing runs, the same
exit code whatever the format, GitHub annotations' escaping and the job summary, paired -o files."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from bnaudit.report import OutputFormat
from bnaudit.report.github import annotation, escape_data, escape_property
from bnaudit.report.model import FailOn, Finding, FindingKind, Severity
from bnaudit.report.sarif import RULES
from tests.conftest import REPO, REPORT_SCHEMA, bn_state, call_main, save_ranks

CHANNELS = {"stem": 4, "layer1": 8}
FORMATS = [f.value for f in OutputFormat]

# The parts of the OASIS SARIF 2.1.0 schema (sarif-schema-2.1.0.json) that a bnaudit log uses, with the
# same required properties and enumerations, plus what code-scanning services need (rules, locations).
SARIF_SUBSET = {
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "version": {"const": "2.1.0"},
        "$schema": {"type": "string", "format": "uri"},
        "runs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["tool", "results"],
                "properties": {
                    "tool": {
                        "type": "object",
                        "required": ["driver"],
                        "properties": {
                            "driver": {
                                "type": "object",
                                "required": ["name", "version", "informationUri", "rules"],
                                "properties": {
                                    "name": {"const": "bnaudit"},
                                    "informationUri": {"type": "string", "pattern": "^https://"},
                                    "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
                                },
                            }
                        },
                    },
                    "results": {"type": "array", "items": {"$ref": "#/$defs/result"}},
                    "invocations": {
                        "type": "array",
                        "items": {"type": "object", "required": ["executionSuccessful"]},
                    },
                },
            },
        },
    },
    "$defs": {
        "message": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
        "rule": {
            "type": "object",
            "required": ["id", "shortDescription", "fullDescription", "defaultConfiguration"],
            "properties": {
                "id": {"type": "string"},
                "shortDescription": {"$ref": "#/$defs/message"},
                "fullDescription": {"$ref": "#/$defs/message"},
                "defaultConfiguration": {
                    "type": "object",
                    "properties": {"level": {"enum": ["none", "note", "warning", "error"]}},
                },
            },
        },
        "result": {
            "type": "object",
            "required": ["ruleId", "level", "message", "locations", "partialFingerprints"],
            "properties": {
                "ruleId": {"type": "string"},
                "ruleIndex": {"type": "integer", "minimum": 0},
                "level": {"enum": ["none", "note", "warning", "error"]},
                "message": {"$ref": "#/$defs/message"},
                "baselineState": {"enum": ["new", "unchanged", "updated", "absent"]},
                "partialFingerprints": {"type": "object", "additionalProperties": {"type": "string"}},
                "suppressions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["kind"],
                        "properties": {"kind": {"enum": ["inSource", "external"]}},
                    },
                },
                "locations": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["physicalLocation"],
                        "properties": {
                            "physicalLocation": {
                                "type": "object",
                                "required": ["artifactLocation"],
                                "properties": {
                                    "artifactLocation": {
                                        "type": "object",
                                        "required": ["uri", "uriBaseId"],
                                        "properties": {
                                            "uri": {"type": "string", "pattern": "^[^/]"},
                                            "uriBaseId": {"const": "%SRCROOT%"},
                                        },
                                    },
                                    "region": {
                                        "type": "object",
                                        "properties": {"startLine": {"type": "integer", "minimum": 1}},
                                    },
                                },
                            }
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture
def runs(tmp_path, rng, monkeypatch):
    """A repository (``.git``) holding a passing and a failing set of rank checkpoints under ckpts/."""
    (tmp_path / ".git").mkdir()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    good = save_ranks(folder, [bn_state(CHANNELS, rng)] * 2, name="good")
    bad = save_ranks(folder, [bn_state(CHANNELS, rng, shift=4.0 * r) for r in range(3)], name="bad")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return [str(p.relative_to(tmp_path)) for p in good], [str(p.relative_to(tmp_path)) for p in bad]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exit_code_is_the_same_for_every_format(capsys, runs, fmt):
    good, bad = runs
    assert call_main(capsys, "--no-config", "compare", *good, "--format", fmt)[0] == 0
    assert call_main(capsys, "--no-config", "compare", *bad, "--format", fmt)[0] == 1
    assert call_main(capsys, "--no-config", "compare", *bad, "--format", fmt, "--fail-on", "never")[0] == 0


def _compare_document(capsys, runs, which: str, fmt: str, schema: dict) -> tuple[int, dict, list]:
    """compare's ``fmt`` report on the passing or failing ranks, parsed and checked against ``schema``."""
    paths = runs[0] if which == "pass" else runs[1]
    code, out, _ = call_main(capsys, "compare", *paths, "--format", fmt)
    doc = json.loads(out)
    jsonschema.validate(doc, schema)
    return code, doc, paths


@pytest.mark.parametrize("which", ["pass", "fail"])
def test_json_follows_its_schema(capsys, runs, which):
    code, doc, paths = _compare_document(capsys, runs, which, "json", REPORT_SCHEMA)
    assert doc["verdict"] == which and code == (which == "fail")
    assert doc["headline"] == "gate_kl" and doc["summary"]["baselined"] == 0
    assert all(len(row["per_rank_max_shift"]) == len(paths) for row in doc["layers"])


@pytest.mark.parametrize("which", ["pass", "fail"])
def test_sarif_is_a_valid_log_with_a_rule_per_kind(capsys, runs, which):
    code, log, _ = _compare_document(capsys, runs, which, "sarif", SARIF_SUBSET)
    run = log["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == [k.value for k in FindingKind]
    assert run["properties"]["verdict"] == which
    if which == "pass":
        assert code == 0 and run["results"] == []
        return
    assert code == 1 and run["results"]
    for result in run["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri == "ckpts/bad_rank0.pt"  # relative to the repository root, not the working folder
    assert {r["level"] for r in run["results"]} == {"error"}


def test_sarif_paths_are_relative_to_the_repository_root_from_a_subfolder(capsys, runs, monkeypatch):
    _, bad = runs
    monkeypatch.chdir("ckpts")
    _, out, _ = call_main(capsys, "compare", *(Path(p).name for p in bad), "--format", "sarif")
    result = json.loads(out)["runs"][0]["results"][0]
    assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "ckpts/bad_rank0.pt"


def test_every_finding_kind_has_a_sarif_rule():
    assert set(RULES) == set(FindingKind)


@pytest.mark.parametrize("which", ["pass", "fail"])
def test_junit_has_a_suite_per_state_dict_and_a_case_per_layer(capsys, runs, which):
    paths = runs[0] if which == "pass" else runs[1]
    code, out, _ = call_main(capsys, "compare", *paths, "--format", "junit")
    root = ET.fromstring(out)
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["model"]
    cases = suites[0].findall("testcase")
    assert sorted(c.get("name") for c in cases) == ["layer1.bn", "stem.bn"]
    failures = [c for c in cases if c.find("failure") is not None]
    assert int(suites[0].get("failures")) == len(failures) == int(root.get("failures"))
    assert int(suites[0].get("tests")) == len(cases)
    assert (len(failures) > 0) == (code == 1)
    for case in failures:
        assert case.find("failure").get("type") == "divergence"


def test_junit_failures_follow_fail_on(capsys, runs):
    _, bad = runs
    _, out, _ = call_main(capsys, "compare", *bad, "--format", "junit", "--fail-on", "never")
    assert ET.fromstring(out).get("failures") == "0"


def test_junit_findings_without_a_layer_are_their_own_cases(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import torch

    path = tmp_path / "plain.pt"
    torch.save({"model": {"fc.weight": torch.ones(2, 2)}}, path)
    code, out, _ = call_main(capsys, "inspect", "plain.pt", "--format", "junit", "--fail-on", "warn")
    root = ET.fromstring(out)
    names = [c.get("name") for c in root.iter("testcase")]
    assert code == 1 and names == ["no-batchnorm: plain.pt"]
    assert root.find("testsuite/testcase/failure").get("type") == "no-batchnorm"


def test_markdown_report(capsys, runs):
    good, bad = runs
    code, out, _ = call_main(capsys, "compare", *bad, "--format", "markdown")
    assert code == 1 and out.startswith("## ❌ bnaudit compare: FAIL")
    assert "| layer | state dict | status | mean KL |" in out and "### Findings" in out
    code, out, _ = call_main(capsys, "compare", *good, "--format", "markdown")
    assert code == 0 and out.startswith("## ✅ bnaudit compare: PASS") and "### Findings" not in out


def test_markdown_escapes_untrusted_text():
    from bnaudit.report.markdown import escape

    assert escape("a|b [x](http://e) <img> *y*\nz") == "a\\|b \\[x\\](http://e) \\<img\\> \\*y\\* z"


_COMMAND = re.compile(r"^::(error|warning|notice)( (?P<props>[^:]*))?::(?P<message>.*)$")


def test_github_annotations(capsys, runs):
    _, bad = runs
    code, out, _ = call_main(capsys, "compare", *bad, "--format", "github")
    lines = out.splitlines()
    annotations = [m for m in map(_COMMAND.match, lines) if m]
    assert code == 1 and len(annotations) >= 1
    for m in annotations:
        props = dict(p.split("=", 1) for p in m.group("props").split(","))
        assert props["file"] == "ckpts/bad_rank0.pt" and props["title"].startswith("bnaudit divergence")
        assert m.group(1) == "error"
    # The table echoes names from the checkpoint: workflow commands are off around it.
    start = next(line for line in lines if line.startswith("::stop-commands::"))
    token = start.split("::")[2]
    assert f"::{token}::" in lines
    assert lines[-2].startswith("FAIL:") and lines[-1].startswith("Next:")


def test_github_escaping():
    assert escape_data("100% done\r\nnext") == "100%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    finding = Finding(Severity.WARN, FindingKind.DIVERGENCE, "bad\nline: 50%", state_dict="m", layer="x,y:z")
    line = annotation(finding, "dir, with:odd/rank0.pt")
    assert line == (
        "::warning file=dir%2C with%3Aodd/rank0.pt,title=bnaudit divergence in m%3Ax%2Cy%3Az::bad%0Aline: 50%25"
    )
    assert "\n" not in line
    accepted = annotation(Finding(Severity.ERROR, FindingKind.NONFINITE, "m", baselined=True), None)
    assert accepted.startswith("::notice title=") and "baseline" in accepted


def test_github_job_summary_is_appended(capsys, runs, tmp_path, monkeypatch):
    _, bad = runs
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, _, _ = call_main(capsys, "compare", *bad, "--format", "github")
    text = summary.read_text()
    assert code == 1 and text.startswith("earlier step\n## ❌ bnaudit compare: FAIL")
    # Other formats leave the summary alone.
    call_main(capsys, "compare", *bad, "--format", "json")
    assert summary.read_text() == text


def test_several_formats_with_paired_files(capsys, runs, tmp_path):
    _, bad = runs
    code, out, err = call_main(
        capsys, "compare", *bad, "--format", "github", "--format", "sarif", "-o", "r.sarif",
        "--format", "json", "-o", "r.json", "--format", "junit", "-o", "r.xml",
    )  # fmt: skip
    assert code == 1 and out.startswith("::error ")  # github, the format without -o, on stdout
    assert json.loads((tmp_path / "r.sarif").read_text())["version"] == "2.1.0"
    jsonschema.validate(json.loads((tmp_path / "r.json").read_text()), REPORT_SCHEMA)
    assert ET.parse(tmp_path / "r.xml").getroot().tag == "testsuites"
    assert "sarif report written to r.sarif (verdict: fail)" in err


def test_output_before_format_and_in_order_pairing(capsys, runs, tmp_path):
    _, bad = runs
    call_main(
        capsys, "compare", *bad, "--format", "json", "--format", "sarif", "-o", "a.json", "-o", "b.sarif"
    )
    assert "schema_version" in json.loads((tmp_path / "a.json").read_text())
    assert "runs" in json.loads((tmp_path / "b.sarif").read_text())
    code, out, _ = call_main(
        capsys, "compare", *bad, "--format", "sarif", "-o", "c.sarif", "--format", "markdown"
    )
    assert code == 1 and out.startswith("## ") and (tmp_path / "c.sarif").exists()
    code, out, _ = call_main(
        capsys, "compare", *bad, "--format", "github", "-o", "-", "--format", "json", "-o", "d.json"
    )
    assert code == 1 and out.startswith("::error ") and (tmp_path / "d.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "json", "-o", "a.json", "-o", "b.json"], "2 -o file(s) for 1 --format(s)"),
        (["--format", "json", "--format", "sarif"], "would all go to stdout"),
        (["--format", "json", "-o", "r.json", "--format", "sarif", "-o", "r.json"], "given for two formats"),
        (["--format", "github", "-o", "r.sarif"], "its suffix says sarif"),
    ],
)
def test_mismatched_formats_and_files_exit_2(capsys, runs, args, message):
    _, bad = runs
    code, out, err = call_main(capsys, "compare", *bad, *args)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_table_is_still_the_default_and_writes_to_a_file(capsys, runs, tmp_path):
    _, bad = runs
    code, out, _ = call_main(capsys, "compare", *bad, "-o", "report.txt")
    assert code == 1 and out == "" and (tmp_path / "report.txt").read_text().startswith("bnaudit compare:")


def test_renderers_take_the_verdict_from_fail_on(runs):
    from bnaudit.audit.compare import compare_ranks
    from bnaudit.report import render

    _, bad = runs
    report = compare_ranks(bad)
    for fmt in OutputFormat:
        assert render(report, fmt, FailOn.NEVER) != render(report, fmt, FailOn.ERROR)


def test_shipped_integrations_are_well_formed():
    hooks = (REPO / ".pre-commit-hooks.yaml").read_text()
    files = re.search(r"^  files: (.+)$", hooks, re.M).group(1)
    assert all(re.search(files, f"m/x.{ext}") for ext in ("pt", "pth", "ckpt", "bin", "safetensors"))
    assert not re.search(files, "model.py")
    assert "id: bnaudit-compare" in hooks and "id: bnaudit-inspect" in hooks
    action = (REPO / "action.yml").read_text()
    assert "using: composite" in action and "--format github" in action
    yaml = pytest.importorskip("yaml")
    parsed = yaml.safe_load(action)
    assert {"command", "args", "python-version", "version", "extras"} <= set(parsed["inputs"])
    assert {"exit-code", "verdict"} <= set(parsed["outputs"])
    assert [h["id"] for h in yaml.safe_load(hooks)] == ["bnaudit-inspect", "bnaudit-compare"]
