"""The remote objects' range cache: reads answered from exactly the ranges fetched, gaps requested once."""

from __future__ import annotations

import random

import pytest

from bnaudit.checkpoint import rangecache
from bnaudit.checkpoint.rangecache import MERGE_GAP, RangeCache

DATA = bytes(random.Random(3).randrange(256) for _ in range(50_000))


class Source:
    """Reads through a RangeCache over DATA, recording each request as (start, end)."""

    def __init__(self) -> None:
        self.cache = RangeCache()
        self.requests: list[tuple[int, int]] = []

    def pread(self, size: int, offset: int) -> bytes:
        end = min(offset + size, len(DATA))
        if size <= 0 or offset >= end:
            return b""
        for start, stop in self.cache.missing(offset, end):
            self.requests.append((start, stop))
            self.cache.keep(start, DATA[start:stop])
        return self.cache.read(offset, end)


def test_only_the_missing_bytes_are_requested_and_small_gaps_merge() -> None:
    source = Source()
    assert source.pread(100, 1000) == DATA[1000:1100]
    assert source.pread(MERGE_GAP + 1, 2000) == DATA[2000 : 2001 + MERGE_GAP]
    assert source.requests == [(1000, 1100), (2000, 2001 + MERGE_GAP)]
    # Three gaps: the 100 held bytes between the first two are re-read with them, the held 513 are not.
    assert source.pread(3000, 0) == DATA[:3000]
    assert source.requests[2:] == [(0, 2000), (2001 + MERGE_GAP, 3000)]
    assert source.pread(3000, 0) == DATA[:3000] and len(source.requests) == 4  # all held now


@pytest.mark.parametrize("cap", [64 << 20, 5_000])
def test_random_reads_give_the_file_bytes(monkeypatch: pytest.MonkeyPatch, cap: int) -> None:
    monkeypatch.setattr(rangecache, "CACHE_BYTES", cap)
    source, rng = Source(), random.Random(cap)
    for _ in range(2_000):
        offset, size = rng.randrange(55_000), rng.randrange(6_000)
        assert source.pread(size, offset) == DATA[offset : offset + size]
    fetched = sum(end - start for start, end in source.requests)
    if cap > len(DATA):  # nothing dropped: every byte fetched at most once, but for merged small gaps
        assert fetched <= len(DATA) + MERGE_GAP * len(source.requests)
