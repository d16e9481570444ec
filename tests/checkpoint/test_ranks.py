"""Rank numbers from file names, glob expansion and ordering."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnaudit.checkpoint.rank_files import rank_from_name, resolve_rank_files
from bnaudit.errors import InputError, UsageError


@pytest.mark.parametrize(
    ("name", "position", "rank"),
    [
        ("ckpt_rank3.pt", 0, 3),
        ("epoch10_rank-12.pt", 0, 12),
        ("RANK_7.safetensors", 0, 7),
        ("model_5_of_8_2.pt", 0, 2),
        ("model.pt", 4, 4),
    ],
)
def test_rank_from_name(name, position, rank):
    assert rank_from_name(Path("run9") / name, position) == rank


def _touch(folder: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        (folder / name).write_bytes(b"x")
        out.append(str(folder / name))
    return out


def test_glob_and_numeric_order(tmp_path):
    _touch(tmp_path, "ckpt_rank10.pt", "ckpt_rank2.pt", "ckpt_rank1.pt")
    files, warnings = resolve_rank_files([str(tmp_path / "ckpt_rank*.pt")])
    assert [f.rank for f in files] == [1, 2, 10]
    assert warnings == []


def test_duplicate_file_counts_once(tmp_path):
    a, b = _touch(tmp_path, "r_rank0.pt", "r_rank1.pt")
    files, warnings = resolve_rank_files([a, b, a])
    assert len(files) == 2 and "more than once" in warnings[0]


def test_same_rank_number_falls_back_to_argument_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _touch(tmp_path / "a", "ckpt_rank0.pt")[0]
    b = _touch(tmp_path / "b", "ckpt_rank0.pt")[0]
    files, warnings = resolve_rank_files([b, a])
    assert [f.display for f in files] == [b, a] and warnings


def test_pattern_without_match_and_too_few_files(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        resolve_rank_files([str(tmp_path / "nothing*.pt")])
    only = _touch(tmp_path, "x_rank0.pt")
    with pytest.raises(UsageError, match="at least 2"):
        resolve_rank_files(only)
