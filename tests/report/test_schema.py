"""The JSON report schema covers every field any command writes, and allows no other."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bnaudit.report.json_format import report_to_dict
from bnaudit.report.model import FailOn, Finding, FindingKind, InputInfo, LayerRow, Report, Severity
from bnaudit.report.sections import (
    AverageOutcome,
    BaselineUse,
    CalibrationData,
    Command,
    GlobalEntry,
    RecalibrationOutcome,
)
from tests.conftest import FIXTURES, REPO, REPORT_SCHEMA, call_main
from tests.golden.cases import CASES, GOLDEN

VALIDATOR = jsonschema.Draft202012Validator(REPORT_SCHEMA)
JSON_CASES = [case for case in CASES if "--format" in case.args and "json" in case.args]
SORTED = FIXTURES / "ddp_nosync_sorted"


def _stdout(golden_text: str) -> str:
    return golden_text.split("--- stdout\n", 1)[1].split("\n--- stderr", 1)[0]


def _errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)


def test_every_command_has_a_json_golden_case() -> None:
    assert {case.args[0] for case in JSON_CASES} == {c.value for c in Command}


@pytest.mark.parametrize("case", JSON_CASES, ids=[c.name for c in JSON_CASES])
def test_the_json_report_of_every_command_validates(case: Any) -> None:
    doc = json.loads(_stdout((GOLDEN / f"{case.name}.txt").read_text()))
    assert doc["command"] == case.args[0]
    assert _errors(doc) == []


def _json_run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = call_main(capsys, "--no-config", *args, "--format", "json")
    assert code in (0, 1), err
    doc: dict[str, Any] = json.loads(out)
    return doc


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize(
    ("args", "section"),
    [
        (("inspect", str(SORTED / "ckpt_rank0.pt"), "--security"), "globals"),
        (("inspect", str(SORTED / "ckpt_rank0.pt"), "--layer", "block1.bn"), "channels"),
        (
            ("compare", *(str(p) for p in sorted(SORTED.glob("ckpt_rank*.pt"))), "--layer", "fc_bn"),
            "channels",
        ),
    ],
)
def test_sections_of_the_committed_fixtures_validate(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], section: str
) -> None:
    doc = _json_run(capsys, *args)
    assert doc[section]
    assert _errors(doc) == []


@pytest.mark.usefixtures("in_repo")
def test_a_written_average_and_a_baselined_compare_validate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ranks = [str(p) for p in sorted(SORTED.glob("ckpt_rank*.pt"))]
    average = _json_run(capsys, "average", *ranks, "-o", str(tmp_path / "avg.pt"))
    assert average["average"]["output"] == str(tmp_path / "avg.pt")
    baseline = tmp_path / "baseline.json"
    call_main(capsys, "--no-config", "compare", *ranks, "--write-baseline", str(baseline))
    compare = _json_run(capsys, "compare", *ranks, "--baseline", str(baseline))
    assert compare["baseline"]["path"] == str(baseline)
    for doc in (average, compare, json.loads(baseline.read_text())):
        assert _errors(doc) == []


def _every_section_report(outcome: RecalibrationOutcome) -> Report:
    row = LayerRow(
        "bn", "model", Severity.WARN, 2, {"max_kl": 0.5, "layer_index": 0}, 1, 0, {"pooled_mean": [0.1]}
    )
    finding = Finding(Severity.WARN, FindingKind.DRIFT, "drifted", file="a.pt", layer="bn", baselined=True)
    return Report(
        Command.RECALIBRATE,
        (InputInfo("a.pt", "torch-zip", 0, ("model",)),),
        {"eps": 1e-5},
        (row,),
        (finding,),
        headline="max_kl",
        channel_rows=({"channel": 0, "running_mean": 0.5, "weight": None},),
        globals=(GlobalEntry("os.system", "dangerous", ("data.pkl",), file="a.pt"),),
        warnings=("a note",),
        average=AverageOutcome("o.pt", "o.pt.bnaudit.json", None, "0" * 64, "f" * 64, ("a" * 64,)),
        calibration=CalibrationData(10, 2, {"model": ["extra.weight"]}),
        recalibration=outcome,
        baseline=BaselineUse("b.json", 1),
    )


@pytest.mark.parametrize(
    "outcome",
    [
        RecalibrationOutcome("o.pt", {"model": {"before": {"acc": 0.5}, "after": {"acc": 0.9}}}),
        RecalibrationOutcome(None, refused=True),
    ],
    ids=["written", "refused"],
)
def test_a_report_with_every_section_validates(outcome: RecalibrationOutcome) -> None:
    doc = report_to_dict(_every_section_report(outcome), FailOn.ERROR)
    assert _errors(doc) == []
    assert set(doc) <= set(REPORT_SCHEMA["properties"])


@pytest.mark.parametrize(
    ("where", "field"),
    [((), "surprise"), (("layers", 0), "surprise"), (("findings", 0), "surprise"), (("average",), "extra")],
)
def test_an_unknown_field_is_rejected(where: tuple[str | int, ...], field: str) -> None:
    doc = copy.deepcopy(report_to_dict(_every_section_report(RecalibrationOutcome("o.pt")), FailOn.ERROR))
    target: Any = doc
    for step in where:
        target = target[step]
    target[field] = 1
    assert _errors(doc) != []
