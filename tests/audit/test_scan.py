"""The rank scan shared by compare and average: frozen pass results, one read per rank, layout reuse."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bnaudit.audit import rank_reader, scan
from bnaudit.audit.compare import COMPARE_TEXTS, CompareOptions, compare_ranks
from bnaudit.audit.rank_reader import open_rank
from bnaudit.audit.scan_plan import ScanPlan, scan_layers
from bnaudit.bn.layers import find_bn_layers
from bnaudit.checkpoint import tensors as tensors_module
from bnaudit.checkpoint.rank_files import resolve_rank_files
from bnaudit.checkpoint.same_layout import LayoutTemplate
from bnaudit.repair.average import average_checkpoints
from bnaudit.repair.average_inputs import AverageOptions
from tests.conftest import bn_state, save_ranks

CHANNELS = {"stem": 4, "layer1": 8, "layer2": 6}
LAYERS = [f"{name}.bn" for name in CHANNELS]


def _pooled_float64(states: list[dict], layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Equal-weight pooled mean and variance of one layer, straight from the law of total variance."""
    m = np.stack([s[f"{layer}.running_mean"].double().numpy() for s in states])
    v = np.stack([s[f"{layer}.running_var"].double().numpy() for s in states])
    mean = m.sum(0) / len(states)
    return mean, (v + (m - mean) ** 2).sum(0) / len(states)


def _ranks(tmp_path: Path, rng: np.random.Generator, n: int = 4) -> tuple[list[dict], list[Path]]:
    states = [bn_state(CHANNELS, rng, shift=0.4 * r) for r in range(n)]
    return states, save_ranks(tmp_path, states)


def _plan(paths: list[Path]) -> tuple[ScanPlan, rank_reader.OpenedRank]:
    files, _ = resolve_rank_files([str(p) for p in paths])
    first = open_rank(files[0], None, None)
    pairs = [(sd, bn) for sd in first.sds for bn in find_bn_layers(sd.tensors)]
    plan = ScanPlan(
        files=tuple(files),
        state_dicts=tuple(sd.name for sd in first.sds),
        signatures={sd.name: rank_reader.model_signature(sd) for sd in first.sds},
        layers=scan_layers(pairs),
        eps=1e-5,
        texts=COMPARE_TEXTS,
    )
    return plan, first


def test_each_pass_returns_a_frozen_result(tmp_path, rng):
    _, paths = _ranks(tmp_path, rng)
    plan, first = _plan(paths)
    pooled = scan.pool_ranks(plan, first)
    measured = scan.measure_ranks(plan, pooled)
    for result, field in (
        (plan, "layers"),
        (pooled, "findings"),
        (measured, "layers"),
        (pooled.equal, "mean"),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(result, field, ())
    for array in (pooled.equal.mean, pooled.equal.pooled_var, pooled.kept[1].mean, pooled.kept[1].var):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0.0
    assert isinstance(pooled.kept, tuple) and isinstance(measured.layers, tuple)
    # The second pass leaves the first's result as it was: it can be measured again, to the same numbers.
    again = scan.measure_ranks(plan, pooled)
    for a, b in zip(measured.layers, again.layers, strict=True):
        np.testing.assert_array_equal(a.kl, b.kl)


class _ReadCounter:
    """Counts, per file, the opens and preads the tensor reader makes (through its byte source)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opens: Counter[str] = Counter()
        self.preads: Counter[str] = Counter()
        self._paths: dict[int, str] = {}
        real_open, real_pread = tensors_module.open_read, tensors_module.pread

        def counting_open(path, *args):  # type: ignore[no-untyped-def]
            fd = real_open(path, *args)
            self._paths[fd] = Path(path).name
            self.opens[Path(path).name] += 1
            return fd

        def counting_pread(fd: int, n: int, offset: int) -> bytes:
            self.preads[self._paths.get(fd, "?")] += 1
            return real_pread(fd, n, offset)

        monkeypatch.setattr(tensors_module, "open_read", counting_open)
        monkeypatch.setattr(tensors_module, "pread", counting_pread)


def _count_full_loads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    loads: Counter[str] = Counter()
    real = rank_reader.load_checkpoint

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rank_reader, "load_checkpoint", counting)
    return loads


def _count_reuse(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    seen: Counter[str] = Counter()
    real = LayoutTemplate.same_layout

    def counting(self, path, refs):  # type: ignore[no-untyped-def]
        same = real(self, path, refs)
        seen["same" if same else "other"] += 1
        return same

    monkeypatch.setattr(LayoutTemplate, "same_layout", counting)
    return seen


def test_average_reads_each_rank_once_through_the_layout_template(tmp_path, rng, monkeypatch):
    _, paths = _ranks(tmp_path, rng)
    names = [p.name for p in paths]
    reads = _ReadCounter(monkeypatch)
    loads, reuse = _count_full_loads(monkeypatch), _count_reuse(monkeypatch)
    result = average_checkpoints(paths, None, AverageOptions(dry_run=True))
    assert len(result.report.layers) == len(LAYERS)
    # Rank 0 is parsed in full (the reference); ranks 1-3 share its layout and are read through it.
    assert loads == {names[0]: 1} and reuse == {"same": 3}
    # One open per rank for its statistics, none for the second pass (kept in memory) or the reference.
    assert reads.opens == {name: 1 for name in names}
    average_preads = dict(reads.preads)
    reads.opens.clear(), reads.preads.clear()
    compare_ranks(paths)
    # The provenance hash comes from the same reads: average reads as compare reads.
    assert dict(reads.preads) == average_preads and reads.opens == {name: 1 for name in names}


def test_over_the_budget_the_second_pass_reads_again(tmp_path, rng, monkeypatch):
    _, paths = _ranks(tmp_path, rng)
    expected = average_checkpoints(paths, None, AverageOptions(dry_run=True)).report
    monkeypatch.setattr(scan, "CACHE_BUDGET_BYTES", 0)
    reads = _ReadCounter(monkeypatch)
    got = average_checkpoints(paths, None, AverageOptions(dry_run=True)).report
    assert reads.opens == {p.name: 2 for p in paths}
    assert [r.to_dict() for r in got.layers] == [r.to_dict() for r in expected.layers]
    assert got.average == expected.average


def test_compare_and_average_pool_the_same_statistics(tmp_path, rng):
    states, paths = _ranks(tmp_path, rng)
    compared = {row.name: row for row in compare_ranks(paths).layers}
    averaged = average_checkpoints(paths, None, AverageOptions(dry_run=True))
    written = {(p.key.rpartition(".")[0], p.key.rpartition(".")[2]): p.values for p in averaged.patches}
    for layer in LAYERS:
        mean, var = _pooled_float64([s for s in states], layer)
        np.testing.assert_allclose(compared[layer].arrays["pooled_mean"], mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(compared[layer].arrays["pooled_var"], var, rtol=1e-12)
        np.testing.assert_allclose(written[(layer, "running_mean")], mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(written[(layer, "running_var")], var, rtol=1e-12)


def test_a_pattern_string_is_one_argument(tmp_path, rng):
    _, paths = _ranks(tmp_path, rng, n=3)
    by_list = compare_ranks(paths)
    for argument in (str(tmp_path / "ckpt_rank*.pt"), tmp_path / "ckpt_rank*.pt"):
        report = compare_ranks(argument)
        assert [i.rank for i in report.inputs] == [0, 1, 2]
        assert [r.to_dict() for r in report.layers] == [r.to_dict() for r in by_list.layers]
    result = average_checkpoints(str(tmp_path / "ckpt_rank*.pt"), None, AverageOptions(dry_run=True))
    assert len(result.report.inputs) == 3


def test_options_are_frozen_and_take_lists(tmp_path, rng):
    options = CompareOptions(ignore=["layer*"])  # type: ignore[arg-type]
    assert options.ignore == ("layer*",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.eps = 1.0  # type: ignore[misc]
    _, paths = _ranks(tmp_path, rng, n=2)
    assert [r.name for r in compare_ranks(paths, options).layers] == ["stem.bn"]
    weights = AverageOptions(rank_weights=[2, 1], dry_run=True)  # type: ignore[arg-type]
    assert weights.rank_weights == (2, 1)
    assert average_checkpoints(paths, None, weights).weights == [2.0, 1.0]


def test_a_rank_of_another_model_names_its_file_and_rank(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = bn_state({**CHANNELS, "layer2": 7}, rng)
    paths = save_ranks(tmp_path, [a, b])
    for run in (
        lambda: compare_ranks(paths),
        lambda: average_checkpoints(paths, None, AverageOptions(dry_run=True)),
    ):
        with pytest.raises(rank_reader.ModelMismatchError) as exc:
            run()
        assert exc.value.fields.path == str(paths[1]) and exc.value.fields.where == "rank 1"
        assert "one training run and one step" in (exc.value.fields.fix or "")
    torch.save({"other": a}, tmp_path / "ckpt_rank1.pt")
    with pytest.raises(rank_reader.ModelMismatchError) as exc:
        compare_ranks(paths)
    assert exc.value.fields.where == "rank 1" and "has no state dict 'model'" in exc.value.fields.problem
