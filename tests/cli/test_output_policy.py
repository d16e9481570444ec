"""Nothing is ever lost: every output of every command is checked, before any work, against the inputs,
the other outputs and what it would replace (bnaudit.checkpoint.output_policy)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO, bn_state, call_main, save_ranks

_MODEL = ["--model", f"{REPO / 'fixtures' / 'digits.py'}:build_model"]
_DATA = ["--data", f"{REPO / 'fixtures' / 'digits.py'}:calibration_data"]
_INPUTS = ("ckpt_rank0.pt", "ckpt_rank1.pt")

# Each command's arguments before the outputs under test (its checkpoint -o, for the repairs).
COMMANDS: dict[str, list[str]] = {
    "inspect": ["inspect", "ckpt_rank*.pt"],
    "compare": ["compare", "ckpt_rank*.pt"],
    "drift": ["drift", "ckpt_rank0.pt", *_MODEL, *_DATA],
    "average": ["average", "ckpt_rank*.pt"],
    "recalibrate": ["recalibrate", "ckpt_rank0.pt", *_MODEL, *_DATA],
}
# The options through which each command writes a file.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "inspect": ("-o", "--write-baseline"),
    "compare": ("-o", "--write-baseline", "--plot"),
    "drift": ("-o", "--write-baseline"),
    "average": ("-o", "--report"),
    "recalibrate": ("-o", "--report"),
}
_REPAIRS = ("average", "recalibrate")
_LIBRARY = {
    "inspect": ("bnaudit.audit.inspect", "inspect_checkpoints"),
    "compare": ("bnaudit.audit.compare", "compare_ranks"),
    "drift": ("bnaudit.audit.drift", "drift_checkpoint"),
    "average": ("bnaudit.repair.average", "average_checkpoints"),
    "recalibrate": ("bnaudit.repair.recalibrate", "recalibrate_checkpoint"),
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names relative to it) with its sha256."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with two ranks' checkpoints, as the working directory."""
    rng = np.random.default_rng(7)
    save_ranks(tmp_path, [bn_state({"layer1": 4}, rng) for _ in range(2)])
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command's library function fails the test if it is reached: refusals come before any work."""
    import importlib

    for module, name in _LIBRARY.values():

        def started(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("the command started its work before its outputs were checked")

        monkeypatch.setattr(importlib.import_module(module), name, started)


def _refused(capsys: pytest.CaptureFixture[str], folder: Path, argv: list[str], *needles: str) -> str:
    """Run ``argv``; assert exit 2, one stderr line containing ``needles``, and no file changed or added."""
    before = _snapshot(folder)
    code, _, err = call_main(capsys, "--no-config", *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert _snapshot(folder) == before
    return err


def _argv(command: str, option: str, path: str, *extra: str) -> list[str]:
    argv = [*COMMANDS[command], option, path, *extra]
    if command in _REPAIRS and option != "-o":
        argv += ["-o", "out.pt"]
    return argv


_CASES = [(c, o) for c, options in OUTPUTS.items() for o in options]


@pytest.mark.parametrize(("command", "option"), _CASES)
@pytest.mark.parametrize("alias", ["same-name", "symlink", "hardlink", "dot-path"])
def test_an_output_is_never_an_input(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, command: str, option: str, alias: str
) -> None:
    # rank 1 is an input only through the quoted pattern for compare, average and inspect.
    victim = "ckpt_rank0.pt" if command in ("drift", "recalibrate") else "ckpt_rank1.pt"
    name = {"same-name": victim, "dot-path": f"sub/../{victim}"}.get(alias, f"alias-{alias}.png")
    (run / "sub").mkdir()
    if alias == "symlink":
        os.symlink(victim, run / name)
    elif alias == "hardlink":
        os.link(victim, run / name)
    digest = _sha(run / victim)
    extra = ["--force"] if command in _REPAIRS else []
    _refused(capsys, run, _argv(command, option, name, *extra), name, "is one of the inputs", option)
    assert _sha(run / victim) == digest


@pytest.mark.parametrize("command", ["drift", "recalibrate"])
def test_the_data_file_is_an_input_too(run: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    torch.save(torch.zeros(4, 1, 8, 8), run / "batches.pt")
    argv = [*COMMANDS[command][:2], *_MODEL, "--data", "batches.pt", "-o", "batches.pt"]
    _refused(capsys, run, argv, "batches.pt", "is one of the inputs")


def test_no_output_goes_inside_an_input_folder(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = run / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"x")
    _refused(capsys, run, ["inspect", "dcp", "-o", "dcp/report.txt"], "is inside the input folder dcp")


def test_write_baseline_refreshes_the_baseline_instead_of_reading_it(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --write-baseline records the run afresh and does not apply --baseline: replacing that file (a report)
    # with the new baseline loses nothing, and is how a configured baseline is refreshed.
    assert call_main(capsys, "--no-config", "compare", *_INPUTS, "--write-baseline", "b.json")[0] in (0, 1)
    code, _, err = call_main(
        capsys, "--no-config", "compare", *_INPUTS, "--baseline", "b.json", "--write-baseline", "b.json"
    )
    assert code in (0, 1), err
    assert json.loads((run / "b.json").read_text())["command"] == "compare"


def _pairs() -> list[tuple[str, str, str]]:
    pairs = []
    for command, options in OUTPUTS.items():
        pairs += [(command, a, b) for i, a in enumerate(options) for b in options[i + 1 :]]
    pairs += [(command, "-o", "-o") for command in ("inspect", "compare", "drift")]  # two formats, one file
    return pairs


@pytest.mark.parametrize(("command", "first", "second"), _pairs())
def test_two_outputs_are_never_one_file(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, command: str, first: str, second: str
) -> None:
    argv, same = [*COMMANDS[command]], str(run / "r.png")  # another spelling of r.png
    if first == second == "-o":
        argv += ["--format", "json", "-o", "r.png", "--format", "sarif", "-o", same]
    else:
        argv += [first, "r.png", second, same]
    _refused(capsys, run, argv, "r.png", "is given to")


@pytest.mark.parametrize("command", _REPAIRS)
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_the_report_is_not_the_sidecar(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, command: str, force: list[str]
) -> None:
    argv = [*COMMANDS[command], "-o", "out.pt", "--report", "out.pt.bnaudit.json", *force]
    _refused(capsys, run, argv, "out.pt.bnaudit.json", "sidecar")


def _torch_zip(path: Path) -> None:
    torch.save({"w": torch.ones(3)}, path)


def _legacy(path: Path) -> None:
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))


def _safetensors(path: Path) -> None:
    save_file({"w": torch.ones(3)}, str(path))


def _sharded_index(path: Path) -> None:
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "model-00001.safetensors"}}))


_CHECKPOINTS = {
    "torch-zip": _torch_zip,
    "legacy": _legacy,
    "pickle": _pickle,
    "safetensors": _safetensors,
    "sharded-index": _sharded_index,
}
_REPORT_OPTIONS = [(c, o) for c, o in _CASES if not (c in _REPAIRS and o == "-o")]


@pytest.mark.parametrize(("command", "option"), _REPORT_OPTIONS)
@pytest.mark.parametrize("kind", list(_CHECKPOINTS))
def test_a_report_never_replaces_a_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, command: str, option: str, kind: str
) -> None:
    # Named like a report (the .png fits --plot too): the content, not the name, makes it a checkpoint.
    _CHECKPOINTS[kind](run / "notes.png")
    extra = ["--force"] if command in _REPAIRS else []
    _refused(capsys, run, _argv(command, option, "notes.png", *extra), "notes.png", "is a checkpoint")


@pytest.mark.parametrize("option", ["-o", "--write-baseline"])
def test_a_report_never_replaces_other_binary_data(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, option: str
) -> None:
    (run / "photo.dat").write_bytes(bytes(range(256)) * 4)
    _refused(capsys, run, ["compare", *_INPUTS, option, "photo.dat"], "photo.dat", "is not a report")


def test_a_missing_folder_is_refused_before_the_work(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    _refused(capsys, run, ["compare", *_INPUTS, "--write-baseline", "nowhere/b.json"], "nowhere")


@pytest.mark.parametrize(("option", "old"), [("-o", "old table\n"), ("--write-baseline", '{"old": 1}\n')])
def test_a_report_replaces_a_previous_report(
    run: Path, capsys: pytest.CaptureFixture[str], option: str, old: str
) -> None:
    (run / "r.json").write_text(old)
    argv = ["compare", *_INPUTS, "--fail-on", "never", "--format", "json", option, "r.json"]
    code, _, err = call_main(capsys, "--no-config", *argv)
    assert code == 0, err
    assert json.loads((run / "r.json").read_text())["findings"]


@pytest.mark.parametrize("command", _REPAIRS)
@pytest.mark.parametrize("existing", ["out.pt", "out.pt.bnaudit.json"])
def test_a_repair_replaces_an_existing_output_only_with_force(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, command: str, existing: str
) -> None:
    _torch_zip(run / existing)
    _refused(capsys, run, [*COMMANDS[command], "-o", "out.pt"], existing, "already exists", "--force")


def test_average_with_force_replaces_an_existing_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _torch_zip(run / "out.pt")
    old = _sha(run / "out.pt")
    code, _, err = call_main(
        capsys, "--no-config", "average", *_INPUTS, "-o", "out.pt", "--force", "--fail-on", "never"
    )
    assert code == 0, err
    sidecar = json.loads((run / "out.pt.bnaudit.json").read_text())
    assert _sha(run / "out.pt") == sidecar["output"]["sha256"] != old


@pytest.mark.parametrize("command", _REPAIRS)
@pytest.mark.parametrize("name", ["report.json", "r.sarif", "r.xml", "r.md"])
def test_a_repair_given_a_report_name_with_format_means_report(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None, command: str, name: str
) -> None:
    argv = [*COMMANDS[command], "--format", "json", "-o", name]
    _refused(capsys, run, argv, name, f"--report {name}")


def test_average_report_and_checkpoint_in_one_file_is_refused(
    run: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    argv = ["average", *_INPUTS, "-o", "out.pt", "--report", "out.pt", "--force"]
    _refused(capsys, run, argv, "out.pt", "is given to both -o (checkpoint) and --report (report)")
