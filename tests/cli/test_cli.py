"""The command line: exit codes, formats, output files, errors without tracebacks, no torch import."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

import bnaudit
from tests.conftest import REPO, REPORT_SCHEMA, bn_state, call_main, run_cli, save_ranks

CHANNELS = {"stem": 4, "layer1": 8}


@pytest.fixture
def ranks(tmp_path, rng):
    good = save_ranks(tmp_path, [bn_state(CHANNELS, rng)] * 2, name="good")
    states = [bn_state(CHANNELS, rng, shift=4.0 * r) for r in range(3)]
    bad = save_ranks(tmp_path, states, name="bad")
    return good, bad


def test_version(capsys):
    code, out, _ = call_main(capsys, "--version")
    assert code == 0 and out.strip() == f"bnaudit {bnaudit.__version__}"


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_exit_codes_do_not_depend_on_format(capsys, ranks, fmt):
    good, bad = ranks
    assert call_main(capsys, "compare", *map(str, good), "--format", fmt)[0] == 0
    assert call_main(capsys, "compare", *map(str, bad), "--format", fmt)[0] == 1
    assert call_main(capsys, "compare", *map(str, bad), "--format", fmt, "--fail-on", "never")[0] == 0


def test_json_report_follows_the_schema(capsys, ranks):
    _, bad = ranks
    code, out, _ = call_main(capsys, "compare", *map(str, bad), "--format", "json")
    doc = json.loads(out)
    jsonschema.validate(doc, REPORT_SCHEMA)
    assert code == 1 and doc["verdict"] == "fail" and doc["schema_version"] == 1
    assert doc["layers"][0]["severity"] == "error" and doc["findings"][0]["kind"] == "divergence"


def test_table_names_worst_layer_and_next_step(capsys, ranks):
    _, bad = ranks
    code, out, _ = call_main(capsys, "compare", *map(str, bad))
    assert code == 1
    assert "FAIL:" in out and "Next: bnaudit average" in out
    table_lines = out.splitlines()
    header = next(i for i, line in enumerate(table_lines) if line.startswith("layer"))
    assert "error" in table_lines[header + 2]


def test_quoted_glob_is_expanded(capsys, ranks, tmp_path):
    code, out, _ = call_main(capsys, "compare", str(tmp_path / "bad_rank*.pt"), "--format", "json")
    assert code == 1 and len(json.loads(out)["inputs"]) == 3


def test_report_to_file(capsys, ranks, tmp_path):
    good, _ = ranks
    target = tmp_path / "report.json"
    target.write_text("old")
    code, out, err = call_main(capsys, "compare", *map(str, good), "--format", "json", "-o", str(target))
    assert code == 0 and out == "" and "report written" in err
    jsonschema.validate(json.loads(target.read_text()), REPORT_SCHEMA)


def test_inspect_exit_codes(capsys, tmp_path, rng):
    sd = bn_state(CHANNELS, rng)
    torch.save({"model": sd}, tmp_path / "ok.pt")
    assert call_main(capsys, "inspect", str(tmp_path / "ok.pt"))[0] == 0
    sd["stem.bn.running_var"][0] = float("inf")
    torch.save({"model": sd}, tmp_path / "bad.pt")
    code, out, _ = call_main(capsys, "inspect", str(tmp_path / "bad.pt"), "--format", "json")
    assert code == 1
    doc = json.loads(out)
    jsonschema.validate(doc, REPORT_SCHEMA)
    assert doc["findings"][0]["kind"] == "nonfinite"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: [str(d / "missing_rank0.pt"), str(d / "missing_rank1.pt")], "missing_rank0.pt"),
        (lambda d: [str(d), str(d)], ""),
        (lambda d: [str(d / "nothing*.pt")], "matches no file"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, make, expected):
    code, _, err = call_main(capsys, "compare", *make(tmp_path))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and expected in err


def test_different_models_exit_2(capsys, tmp_path, rng):
    paths = save_ranks(tmp_path, [bn_state(CHANNELS, rng), bn_state({"stem": 4}, rng)])
    code, _, err = call_main(capsys, "compare", *map(str, paths))
    assert code == 2 and "not the same model" in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys, ranks):
    good, _ = ranks
    assert call_main(capsys, "compare", *map(str, good), "--fail-on", "sometimes")[0] == 2
    assert call_main(capsys, "compare")[0] == 2
    assert call_main(capsys, "nonsense")[0] == 2
    code, _, err = call_main(capsys, "compare", *map(str, good), "--warn-kl", "2", "--error-kl", "1")
    assert code == 2 and "--warn-kl" in err


def test_internal_error_exit_3_and_debug_traceback(capsys, ranks, monkeypatch):
    good, _ = ranks

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("bnaudit.audit.compare.compare_ranks", boom)
    code, _, err = call_main(capsys, "compare", *map(str, good))
    assert code == 3 and "internal error" in err and "kaboom" in err and "Traceback" not in err
    code, _, err = call_main(capsys, "--debug", "compare", *map(str, good))
    assert code == 3 and "Traceback" in err


def test_interrupt_exit_130(capsys, ranks, monkeypatch):
    good, _ = ranks

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bnaudit.audit.compare.compare_ranks", interrupted)
    code, _, err = call_main(capsys, "compare", *map(str, good))
    assert code == 130 and "interrupted" in err


def test_subprocess_never_imports_torch(tmp_path, rng):
    """inspect, compare and diff run without torch: make torch unimportable and run the real CLI."""
    paths = save_ranks(tmp_path, [bn_state(CHANNELS, rng, shift=r) for r in range(2)])
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    runs = (["compare", *map(str, paths)], ["inspect", str(paths[0])], ["diff", *map(str, paths)], ["--help"])
    for args in runs:
        result = run_cli(*args, env=env)
        assert result.returncode in (0, 1), result.stderr
        assert "Traceback" not in result.stderr


def test_python_dash_m_entry_point():
    result = run_cli("--help")
    assert result.returncode == 0 and "compare" in result.stdout and "inspect" in result.stdout
    assert Path(sys.executable).exists()
