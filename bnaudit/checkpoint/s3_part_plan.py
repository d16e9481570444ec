"""The parts of a server-side patched copy: which output ranges S3 copies, which the client uploads.

S3's rules for a multipart upload: every part but the last at least ``MIN_PART`` (5 MiB), none above
``MAX_PART`` (5 GiB), at most ``MAX_PARTS`` (10,000). A part that holds a patched byte is uploaded whole
(its unchanged bytes fetched by range GET); every other part is copied inside the store
(``UploadPartCopy``). :func:`plan_parts` chooses the cut that uploads the fewest bytes.

The layout is an alternation of copy runs (inside the clean gaps between dirty ranges) and upload runs,
each at least ``MIN_PART`` long except the last. For a chosen sequence of copy runs, starting each run as
early as it may (``max(gap start, previous run start + 2 * MIN_PART)``: the previous run and the upload
run after it both need ``MIN_PART``) and ending it as late as the next run allows never costs more, so a
dynamic programme over the candidate gaps (those ``MIN_PART`` long, and the file's tail) that keeps, per
gap, the Pareto-best pairs (bytes uploaded before the run, run start) finds the optimum exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

MIN_PART = 5 << 20
MAX_PART = 5 << 30
MAX_PARTS = 10_000
# Uploaded parts are built in memory: split long upload runs into parts of at most this much.
MAX_UPLOAD_PART = 64 << 20


@dataclass(frozen=True)
class Part:
    """One part of the output: ``[start, end)`` in output offsets, copied server-side or uploaded."""

    start: int
    end: int
    copy: bool

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PartLimits:
    """S3's part rules (tests shrink them to brute-force small files)."""

    min_part: int = MIN_PART
    max_part: int = MAX_PART
    max_upload_part: int = MAX_UPLOAD_PART


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty ``[start, end)`` ranges with overlapping and touching ones merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _gaps(size: int, dirty: list[tuple[int, int]], min_part: int) -> list[tuple[int, int]]:
    """The clean gaps that can hold a copy run: at least ``min_part`` long, or the file's clean tail."""
    edges = [0, *(x for r in dirty for x in r), size]
    gaps = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]
    return [(a, b) for a, b in gaps if b - a >= min_part or b == size]


def _copy_runs(size: int, dirty: list[tuple[int, int]], min_part: int) -> list[tuple[int, int]]:
    """The copy runs of the cheapest layout (empty: upload everything)."""
    gaps = _gaps(size, dirty, min_part)
    # Per gap: Pareto-best (uploaded bytes before the run, run start, previous state) from the left.
    fronts: list[list[tuple[int, int, tuple[int, int] | None]]] = []
    for j, (g0, g1) in enumerate(gaps):
        found: list[tuple[int, int, tuple[int, int] | None]] = []
        first = 0 if g0 == 0 else max(g0, min_part)  # the run before a copy run is one part >= min_part
        found.append((first, first, None))
        for k in range(j):
            for i, (cost, x, _) in enumerate(fronts[k]):
                if x + min_part > gaps[k][1]:  # the run in gap k would be shorter than a part
                    continue
                start = max(g0, x + 2 * min_part)
                found.append((cost + start - min(gaps[k][1], start - min_part), start, (k, i)))
        usable = [s for s in found if s[1] < g1 and (s[1] + min_part <= g1 or g1 == size)]
        fronts.append(_pareto(usable))
    best: tuple[int, tuple[int, int] | None] = (size, None)  # no copy run: everything uploaded
    for k, (_, g1) in enumerate(gaps):
        for i, (cost, x, _) in enumerate(fronts[k]):
            total = cost if g1 == size else cost + size - g1
            if (g1 == size or x + min_part <= g1) and total < best[0]:
                best = (total, (k, i))
    runs: list[tuple[int, int]] = []
    state = best[1]
    while state is not None:
        k, i = state
        _, x, state = fronts[k][i]
        y = gaps[k][1] if not runs else min(gaps[k][1], runs[-1][0] - min_part)
        runs.append((x, y))
    return runs[::-1]


def _pareto(
    states: list[tuple[int, int, tuple[int, int] | None]],
) -> list[tuple[int, int, tuple[int, int] | None]]:
    """The states no other beats on both cost and start (lower is better for both)."""
    kept: list[tuple[int, int, tuple[int, int] | None]] = []
    for state in sorted(states, key=lambda s: (s[0], s[1])):
        if not kept or state[1] < kept[-1][1]:
            kept.append(state)
    return kept


def split_range(start: int, end: int, copy: bool, limit: int) -> list[Part]:
    """``[start, end)`` in equal-ish parts of at most ``limit`` (each above ``limit / 2``)."""
    count = -(-(end - start) // limit)
    cuts = [start + (end - start) * i // count for i in range(count + 1)]
    return [Part(a, b, copy) for a, b in itertools.pairwise(cuts)]


def plan_parts(size: int, dirty: Sequence[tuple[int, int]], limits: PartLimits | None = None) -> list[Part]:
    """The parts of an output of ``size`` bytes whose ``dirty`` ranges differ from the copied source.

    Args:
        size: the output's size.
        dirty: output ranges ``[start, end)`` that must be uploaded (patched bytes, CRC-32 fields, header).
        limits: the part rules (S3's by default).

    Returns:
        Contiguous parts covering ``[0, size)`` in order, the fewest bytes uploaded; a single uploaded part
        when nothing can be copied (a small file: one PUT of the patched file).
    """
    lim = limits or PartLimits()
    runs = _copy_runs(size, merge_ranges(dirty), lim.min_part)
    parts: list[Part] = []
    pos = 0
    for x, y in [*runs, (size, size)]:
        if x > pos:
            parts += split_range(pos, x, False, lim.max_upload_part)
        if y > x:
            parts += split_range(x, y, True, lim.max_part)
        pos = y
    return parts


def uploaded_bytes(parts: Sequence[Part]) -> int:
    return sum(p.size for p in parts if not p.copy)
