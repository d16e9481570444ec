"""Baselines: known findings are accepted (shown, not failing); new or worse ones fail; bad files exit 2."""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import pytest

from bnaudit.audit.baseline import apply_baseline, load_baseline
from bnaudit.errors import InputError
from bnaudit.report.model import FailOn, Finding, FindingKind, LayerRow, Report, Severity
from bnaudit.report.sections import Command
from tests.conftest import REPORT_SCHEMA, bn_state, call_main, save_ranks

CHANNELS = {"stem": 4, "layer1": 8}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ranks(folder, rng, shifts: dict[str, float], name: str) -> list[str]:
    """Ranks whose layer statistics are the same except a mean shift per layer on rank 1."""
    base = bn_state(CHANNELS, rng)
    other = dict(base)
    for layer, shift in shifts.items():
        other[f"{layer}.bn.running_mean"] = base[f"{layer}.bn.running_mean"] + shift
    return [str(p.relative_to(folder)) for p in save_ranks(folder, [base, other], name=name)]


def test_accepted_findings_pass_and_are_marked(capsys, folder, rng):
    paths = _ranks(folder, rng, {"stem": 3.0}, "run1")
    code, _, err = call_main(capsys, "compare", *paths, "--write-baseline", "baseline.json")
    assert code == 1 and "baseline of 1 finding(s) written to baseline.json" in err
    written = json.loads((folder / "baseline.json").read_text())
    jsonschema.validate(written, REPORT_SCHEMA)  # a baseline is a JSON report
    assert "pooled_mean" not in written["layers"][0]
    # A later run in another folder (paths differ): the same finding is accepted.
    (folder / "elsewhere").mkdir()
    moved = [f"elsewhere/{p}" for p in paths]
    for src, dst in zip(paths, moved, strict=True):
        (folder / dst).write_bytes((folder / src).read_bytes())
    code, out, _ = call_main(capsys, "compare", *moved, "--baseline", "baseline.json", "--format", "json")
    doc = json.loads(out)
    jsonschema.validate(doc, REPORT_SCHEMA)
    assert code == 0 and doc["verdict"] == "pass"
    assert [f["baselined"] for f in doc["findings"]] == [True]
    assert doc["summary"]["baselined"] == 1 and doc["summary"]["error"] == 1
    assert doc["baseline"] == {"path": "baseline.json", "accepted": 1}
    code, out, _ = call_main(capsys, "compare", *paths, "--baseline", "baseline.json")
    assert code == 0 and "(accepted by the baseline)" in out and "1 accepted by the baseline" in out


def test_new_finding_fails(capsys, folder, rng):
    paths = _ranks(folder, rng, {"stem": 3.0}, "run")
    call_main(capsys, "compare", *paths, "--write-baseline", "baseline.json", "--format", "json")
    worse = _ranks(folder, rng, {"stem": 3.0, "layer1": 3.0}, "run")
    code, out, _ = call_main(capsys, "compare", *worse, "--baseline", "baseline.json", "--format", "json")
    doc = json.loads(out)
    by_layer = {f["layer"]: f["baselined"] for f in doc["findings"]}
    assert code == 1 and by_layer == {"stem.bn": True, "layer1.bn": False}


def test_worse_divergence_fails(capsys, folder, rng):
    paths = _ranks(folder, rng, {"stem": 1.0}, "run")
    call_main(capsys, "compare", *paths, "--write-baseline", "baseline.json", "--format", "json")
    worse = _ranks(folder, rng, {"stem": 3.0}, "run")
    code, out, _ = call_main(capsys, "compare", *worse, "--baseline", "baseline.json", "--format", "json")
    assert code == 1 and [f["baselined"] for f in json.loads(out)["findings"]] == [False]


def _report(severity: Severity, kl: float) -> Report:
    finding = Finding(
        severity, FindingKind.DIVERGENCE, "m", file="/a/x.pt", state_dict="model", layer="l", rank=1
    )
    row = LayerRow("l", "model", severity, 4, {"max_kl": kl})
    return Report(Command.COMPARE, (), {}, (row,), (finding,), headline="max_kl")


def _baseline_of(report: Report, folder) -> object:
    from bnaudit.report.json_format import report_to_dict

    path = folder / "b.json"
    path.write_text(json.dumps(report_to_dict(report, FailOn.ERROR)))
    return load_baseline(path)


def test_worse_is_higher_severity_or_metric_beyond_tolerance(folder):
    baseline = _baseline_of(_report(Severity.WARN, 0.05), folder)
    assert apply_baseline(_report(Severity.WARN, 0.05), baseline).findings[0].baselined
    assert apply_baseline(_report(Severity.WARN, 0.051), baseline).findings[0].baselined  # within 5 %
    assert apply_baseline(_report(Severity.WARN, 0.01), baseline).findings[0].baselined  # better
    assert not apply_baseline(_report(Severity.WARN, 0.06), baseline).findings[0].baselined
    assert not apply_baseline(_report(Severity.ERROR, 0.05), baseline).findings[0].baselined
    moved = _report(Severity.WARN, 0.05)
    other_rank = replace(moved, findings=(replace(moved.findings[0], rank=2),))
    assert not apply_baseline(other_rank, baseline).findings[0].baselined
    other_file = replace(moved, findings=(replace(moved.findings[0], file="/b/y.pt"),))
    assert apply_baseline(other_file, baseline).findings[0].baselined  # never matched on paths
    assert apply_baseline(other_file, baseline).verdict(FailOn.WARN) == "pass"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such baseline file"),
        ("not json", "the baseline is not JSON"),
        ('{"a": 1}', "not a bnaudit JSON report"),
        ('{"tool": {"name": "bnaudit"}, "schema_version": 2, "findings": []}', "unsupported baseline"),
        (
            '{"tool": {"name": "bnaudit"}, "schema_version": 1, "findings": [{"kind": "nope", "severity": "error"}]}',
            "has no valid kind",
        ),
    ],
)
def test_bad_baseline_exits_2(capsys, folder, rng, content, message):
    paths = _ranks(folder, rng, {}, "run")
    if content is not None:
        (folder / "b.json").write_text(content)
    code, out, err = call_main(capsys, "compare", *paths, "--baseline", "b.json")
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    with pytest.raises(InputError) as exc:
        load_baseline(folder / "b.json")
    assert exc.value.fields.path == str(folder / "b.json") and message in exc.value.fields.problem


def test_a_bad_baseline_finding_is_named_by_its_index_and_field(tmp_path):
    path = tmp_path / "b.json"
    good = {"kind": "drift", "severity": "warn"}
    path.write_text(
        json.dumps(
            {"tool": {"name": "bnaudit"}, "schema_version": 1, "findings": [good, {**good, "rank": "0"}]}
        )
    )
    with pytest.raises(InputError) as exc:
        load_baseline(path)
    fields = exc.value.fields
    assert (fields.path, fields.where, fields.expected, fields.found) == (
        str(path),
        "findings[1].rank",
        "an integer or null",
        "'0'",
    )


def test_a_baseline_recorded_in_the_old_headline_is_compared_in_it(tmp_path):
    """A baseline written when compare's headline was max_kl still judges 'worse' by max_kl."""
    import json

    from bnaudit.audit.baseline import apply_baseline, load_baseline
    from bnaudit.audit.compare import compare_ranks
    from bnaudit.report.json_format import report_to_dict
    from bnaudit.report.model import FailOn
    from tests.conftest import FIXTURES

    report = compare_ranks(str(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank*.pt"))
    doc = report_to_dict(report, FailOn.ERROR)
    doc["headline"] = "max_kl"
    path = tmp_path / "old.json"
    for scale, accepted in ((1.0, 2), (0.5, 0)):  # recorded as large as now: accepted; half as large: worse
        for row in doc["layers"]:
            row["metrics"]["max_kl"] = (
                next(r for r in report.layers if r.name == row["name"]).metrics["max_kl"] * scale
            )
        path.write_text(json.dumps(doc))
        marked = apply_baseline(report, load_baseline(path))
        assert sum(f.baselined for f in marked.findings) == accepted
