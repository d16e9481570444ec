"""Files written by torch's own writers with their less common options read as torch reads them.

Whole modules saved with the legacy serialization, zips saved without CRC-32s, and torch.export archives
(refused, with what to do instead); every file here is written by the real torch call.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import assert_matches_torch, assert_same_tensor

from bnaudit.bn.pickle_policy import Safety, classify_global
from bnaudit.checkpoint import load_checkpoint
from bnaudit.errors import InputError, UnsupportedFormatError
from tests.checkpoint.ckpt_helpers import small_bn_model
from tests.conftest import ShellPayload, call_main


def _model() -> torch.nn.Module:
    model = small_bn_model()
    model.register_buffer("scratch", torch.ones(1), persistent=False)
    return model.eval()


class PayloadNet(torch.nn.Module):
    """A user module carrying an object whose unpickling would run ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)
        self.payload = ShellPayload(marker)


# ------------------------------------------------------------------------------ whole pickled modules


@pytest.mark.parametrize("wrapped", [False, True], ids=["root", "in-dict"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_whole_module_reads_as_its_state_dict(tmp_path: Path, zip_format: bool, wrapped: bool) -> None:
    model = _model()
    path = tmp_path / "model.pt"
    torch.save({"model": model} if wrapped else model, path, _use_new_zipfile_serialization=zip_format)
    ckpt = load_checkpoint(path)
    assert ckpt.format == ("torch-zip" if zip_format else "torch-legacy")
    assert [sd.name for sd in ckpt.state_dicts] == (["model"] if wrapped else [""])
    expected = model.state_dict()  # the non-persistent buffer is not in it, nor in ours
    found = ckpt.state_dicts[0].tensors
    assert list(found) == list(expected)
    for key, tensor in expected.items():
        assert_same_tensor(found[key], tensor, key)
    # The module classes are torch's own: a note each, nothing worse.
    safety = {g.qualname: classify_global(g.module, g.name) for g in ckpt.globals}
    assert safety["torch.nn.modules.batchnorm.BatchNorm2d"] is Safety.BENIGN
    assert Safety.DANGEROUS not in safety.values() and Safety.UNKNOWN not in safety.values()


def test_legacy_whole_module_inspects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    torch.save(_model(), path, _use_new_zipfile_serialization=False)
    code, out, err = call_main(capsys, "inspect", str(path), "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert [layer["name"] for layer in report["layers"]] == ["1", "3.1"]
    assert report["inputs"][0]["format"] == "torch-legacy"


def test_legacy_whole_module_payload_is_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save(PayloadNet(marker), path, _use_new_zipfile_serialization=False)
    code, out, _ = call_main(capsys, "inspect", str(path), "--format", "json")
    assert not marker.exists()
    assert code == 1
    kinds = {(f["kind"], f["severity"], f["tensor"]) for f in json.loads(out)["findings"]}
    assert ("unsafe-pickle", "error", "posix.system") in kinds
    assert ("suspicious-pickle", "warn", f"{__name__}.PayloadNet") in kinds


# ------------------------------------------------------------------------------------ no CRC-32


@pytest.fixture
def no_crc32() -> Iterator[None]:
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(True)


def _bn_state(shift: float) -> dict[str, torch.Tensor]:
    return {
        "bn.weight": torch.ones(3),
        "bn.bias": torch.zeros(3),
        "bn.running_mean": torch.tensor([0.5, -1.0, 2.0]) + shift,
        "bn.running_var": torch.tensor([1.5, 0.25, 3.0]) + shift,
        "bn.num_batches_tracked": torch.tensor(10),
    }


def _crcs(path: Path) -> list[int]:
    with zipfile.ZipFile(path) as zf:
        return [info.CRC for info in zf.infolist()]


def test_zip_without_crc32_reads_and_says_so(
    tmp_path: Path, no_crc32: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nocrc.pt"
    torch.save(_bn_state(0.0), path)
    assert set(_crcs(path)) == {0}  # what the writer did, so what the test is about
    ckpt = assert_matches_torch(path)
    assert ckpt.crc32_absent
    code, out, err = call_main(capsys, "inspect", str(path), "--format", "json")
    assert code == 0, err
    notes = [f for f in json.loads(out)["findings"] if f["kind"] == "no-checksum"]
    assert len(notes) == 1 and notes[0]["severity"] == "info"
    assert "no CRC-32 stored" in notes[0]["message"] and "not verified" in notes[0]["message"]


def test_zip_with_crc32_has_no_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "crc.pt"
    torch.save(_bn_state(0.0), path)
    assert 0 not in _crcs(path)
    assert not load_checkpoint(path).crc32_absent
    code, out, _ = call_main(capsys, "inspect", str(path), "--format", "json")
    assert code == 0 and all(f["kind"] != "no-checksum" for f in json.loads(out)["findings"])


def test_one_zeroed_crc_among_real_ones_is_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "crc.pt"
    torch.save(_bn_state(0.0), path)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
        directory_at = zf.start_dir
    data = bytearray(path.read_bytes())
    record = directory_at  # torch writes data.pkl first: its central record opens the directory
    assert data[record : record + 4] == b"PK\x01\x02"
    assert struct.unpack_from("<L", data, record + 16)[0] == info.CRC
    struct.pack_into("<L", data, record + 16, 0)
    struct.pack_into("<L", data, info.header_offset + 14, 0)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"Bad CRC-32 for zip entry '.*/data\.pkl'"):
        load_checkpoint(path)


def test_average_of_files_without_crc32_keeps_them_without(
    tmp_path: Path, no_crc32: None, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [tmp_path / f"ckpt_rank{r}.pt" for r in range(2)]
    states = [_bn_state(0.0), _bn_state(1.0)]
    for p, sd in zip(paths, states, strict=True):
        torch.save(sd, p)
    out = tmp_path / "avg.pt"
    code, _, err = call_main(capsys, "average", *map(str, paths), "-o", str(out))
    assert code == 0, err
    assert set(_crcs(out)) == {0}  # zeros stay zeros: a real CRC beside them would read as corruption
    loaded = torch.load(out, weights_only=True)
    means = np.stack([sd["bn.running_mean"].double().numpy() for sd in states])
    variances = np.stack([sd["bn.running_var"].double().numpy() for sd in states])
    mean = means.mean(0)
    pooled = (variances + (means - mean) ** 2).mean(0)
    np.testing.assert_allclose(loaded["bn.running_mean"].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(loaded["bn.running_var"].numpy(), pooled, rtol=1e-6)
    assert load_checkpoint(out).crc32_absent


# ------------------------------------------------------------------------------------ torch.export


def _exported(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = _model()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 6, 6),)), path)
    return path, model


def test_torch_export_archive_is_refused_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = _exported(tmp_path)
    with pytest.raises(UnsupportedFormatError) as err:
        load_checkpoint(path)
    assert "torch.export archive" in str(err.value) and "torch.export.load" in str(err.value)
    code, out, stderr = call_main(capsys, "inspect", str(path))
    assert code == 2 and out == "" and len(stderr.strip().splitlines()) == 1
    assert "torch.export" in stderr and "state_dict" in stderr
    # The fix the message gives works: the exported program's state dict, saved with torch.save.
    weights = tmp_path / "weights.pt"
    torch.save(torch.export.load(path).state_dict, weights)
    found = load_checkpoint(weights).state_dicts[0].tensors
    for key in ("1.running_mean", "1.running_var", "3.1.running_mean", "3.1.running_var"):
        assert_same_tensor(found[key], model.state_dict()[key], key)
