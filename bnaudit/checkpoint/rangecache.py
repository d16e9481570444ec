"""The byte ranges of one remote object fetched so far: exactly the ranges asked for, no rounding to blocks.

A read requests only its parts not held yet, one request per missing part, except that parts separated by
at most ``MERGE_GAP`` held bytes share a request (a request costs a round trip; a few hundred bytes cost
nothing). The least recently read ranges are dropped past ``CACHE_BYTES``. Not thread-safe: the caller
holds a lock.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

MERGE_GAP = 512
CACHE_BYTES = 64 << 20


class RangeCache:
    """Disjoint held spans of one object, keyed by start, least recently read first."""

    def __init__(self) -> None:
        self._spans: OrderedDict[int, bytes] = OrderedDict()
        self._starts: list[int] = []  # the same starts, sorted
        self._held = 0

    def _held_in(self, offset: int, end: int) -> list[tuple[int, int]]:
        """The held spans overlapping ``[offset, end)``, as (start, end), in order."""
        found = []
        for start in self._starts[max(bisect.bisect_right(self._starts, offset) - 1, 0) :]:
            if start >= end:
                break
            stop = start + len(self._spans[start])
            if stop > offset:
                found.append((start, stop))
        return found

    def missing(self, offset: int, end: int) -> list[tuple[int, int]]:
        """The ranges of ``[offset, end)`` to request: the gaps between held spans, merged over small ones."""
        gaps: list[tuple[int, int]] = []
        pos = offset
        for start, stop in [*self._held_in(offset, end), (end, end)]:
            if start <= pos:
                pos = max(pos, stop)
                continue
            if gaps and pos - gaps[-1][1] <= MERGE_GAP:
                gaps[-1] = (gaps[-1][0], start)
            else:
                gaps.append((pos, start))
            pos = stop
        return gaps

    def keep(self, start: int, data: bytes) -> None:
        """Hold the parts of ``data`` (read at ``start``) that no span holds yet."""
        pos, end = start, start + len(data)
        for held_start, held_stop in [*self._held_in(start, end), (end, end)]:
            if held_start > pos:
                self._spans[pos] = data[pos - start : held_start - start]
                bisect.insort(self._starts, pos)
                self._held += held_start - pos
            pos = max(pos, held_stop)

    def read(self, offset: int, end: int) -> bytes:
        """The held bytes of ``[offset, end)`` (all of them held: :meth:`missing` was fetched and kept),
        then the least recently read spans dropped past the cap (after the answer is cut: one read may
        exceed it)."""
        pieces = []
        for start, stop in self._held_in(offset, end):
            self._spans.move_to_end(start)
            pieces.append(self._spans[start][max(offset - start, 0) : min(end, stop) - start])
        while self._held > CACHE_BYTES and self._spans:
            old, dropped = self._spans.popitem(last=False)
            self._starts.remove(old)
            self._held -= len(dropped)
        return b"".join(pieces)
