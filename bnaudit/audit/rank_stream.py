"""Read the planned statistics of many ranks in order: layout reuse for byte-equal ranks, prefetch threads.

Worker threads only read: each gets the layout template current when its rank was submitted, and returns
a frozen :class:`RankRead`. Which rank becomes the next template is decided by the consuming thread, in
rank order, as a new :class:`LayoutCache` value; nothing shared is mutated.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bnaudit.audit.rank_reader import (
    OpenedRank,
    RankRead,
    Wanted,
    check_same_model,
    open_rank,
    planned_layers,
    read_stats,
)
from bnaudit.audit.scan_plan import ScanPlan
from bnaudit.bn.layerstats import layer_tensor_refs
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.checkpoint.same_layout import LayoutTemplate
from bnaudit.checkpoint.types import StateDictRef, TensorRef

if TYPE_CHECKING:
    from concurrent.futures import Future

# A rank that is not laid out like the current template becomes the template for the ranks after it, at most
# this many times per run: ranks 1-9, 10-99 and 100-999 of one job differ in the length of their file names,
# which torch.save puts into every zip entry name, so each group has its own layout.
MAX_LAYOUT_TEMPLATES = 8


@dataclass(frozen=True)
class RankTemplate:
    """A rank read in full whose layout later ranks may share (:mod:`bnaudit.checkpoint.same_layout`)."""

    layout: LayoutTemplate
    sds: tuple[StateDictRef, ...]
    wanted: Wanted  # the planned layers, in plan order
    refs: tuple[TensorRef, ...]  # every tensor read_layers reads for them

    def read(self, rf: RankFile, digest: bool) -> RankRead | None:
        """The rank's statistics read through the template, or None when its layout is not the same."""
        if not self.layout.same_layout(rf.path, self.refs):
            return None
        stats, sha = read_stats(self.wanted, rf, rf.path, digest)
        return RankRead(rf, self.layout.checkpoint, self.sds, stats, sha, None)


@dataclass(frozen=True)
class LayoutCache:
    """The current template and how many have been made (at most MAX_LAYOUT_TEMPLATES)."""

    current: RankTemplate | None = None
    built: int = 0

    def offered(self, read: RankRead) -> LayoutCache:
        """The cache after ``read``: a rank read in full becomes the template, within the limit."""
        if read.wanted is None or self.built >= MAX_LAYOUT_TEMPLATES:
            return self
        refs = tuple(layer_tensor_refs(read.wanted))
        layout = LayoutTemplate.of(read.ckpt, refs)
        if layout is None:
            return LayoutCache(self.current, self.built + 1)
        template = RankTemplate(layout, read.sds, read.wanted, refs)
        return LayoutCache(template, self.built + 1)


def read_rank(
    plan: ScanPlan, rf: RankFile, template: RankTemplate | None, opened: OpenedRank | None = None
) -> RankRead:
    """Read one rank's planned statistics: through ``template`` when the file shares its layout, else in
    full (open, same-model check, layer lookup). Safe to call from worker threads: it only reads.

    Raises:
        InputError / ModelMismatchError: the rank cannot be read, or is not the planned model.
        UnsafeUnreadableRank: see :func:`bnaudit.audit.rank_reader.open_rank`.
    """
    if opened is None and template is not None:
        # Same size, directory, local headers and pickle as a rank read in full: same model and layers,
        # so only the statistics are read (the model check, pickle audit and layer lookup carry over).
        reused = template.read(rf, plan.digest)
        if reused is not None:
            return reused
    rank = opened or open_rank(rf, None, plan.state_dicts)
    check_same_model(plan.signatures, rf, plan.files[0], rank.sds, plan.texts.mismatch_fix)
    wanted = planned_layers(plan.layers, rf, rank.sds)
    stats, sha = read_stats(wanted, rf, None, plan.digest)
    return RankRead(rf, rank.ckpt, rank.sds, stats, sha, wanted)


def read_ranks(
    plan: ScanPlan, files: Sequence[RankFile], cache: LayoutCache | None
) -> Iterator[tuple[RankRead, LayoutCache | None]]:
    """Read ``files`` in order, yielding each rank with the layout cache after it (None: no reuse).

    With ``plan.jobs`` > 1, up to that many files are read ahead in threads: file reads release the GIL, so
    threads help on high-latency storage; memory stays bounded by the ranks in flight.
    """
    if plan.jobs <= 1:
        for rf in files:
            read = read_rank(plan, rf, cache.current if cache else None)
            cache = cache.offered(read) if cache else None
            yield read, cache
        return
    from concurrent.futures import ThreadPoolExecutor  # on use: --jobs > 1 only

    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        pending: deque[Future[RankRead]] = deque()
        queue = iter(files)

        def submit(rf: RankFile) -> None:
            pending.append(pool.submit(read_rank, plan, rf, cache.current if cache else None))

        for rf in itertools.islice(queue, plan.jobs):
            submit(rf)
        while pending:
            read = pending.popleft().result()
            cache = cache.offered(read) if cache else None
            for rf in itertools.islice(queue, 1):
                submit(rf)
            yield read, cache
