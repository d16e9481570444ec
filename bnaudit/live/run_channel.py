"""Failure sharing for one distributed pass: no rank enters a collective while another has failed."""

from __future__ import annotations

import itertools
import logging
import time
from datetime import timedelta

from bnaudit.errors import BnauditError, InputError, InternalError, ModelMismatchError
from bnaudit.live.distributed import DistContext

log = logging.getLogger(__name__)

# How long a failing rank waits for the others to read its error before it exits. Rank 0 may host the store
# (plain init without torchrun's agent): leaving at once would cut the others off from the message.
ACK_TIMEOUT_S = 5.0
# How long a rank that finished its pass waits for the slowest rank to finish its own.
DEFAULT_STATUS_TIMEOUT_S = 1800.0
_POLL_S = 0.02

_run_counter = itertools.count()


class RankFailedError(InputError):
    """A rank failed; every rank raises this same error, with the failing rank's exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunChannel:
    """Status exchange for one distributed pass through the group's store, so no rank enters a collective
    while another has failed.

    Protocol (keys under a per-run prefix): a failing rank increments ``nfail``; the first to do so stores
    ``failure`` = ``code|rank|line``, waits briefly for the others' acks, and raises. Every other rank notices
    ``nfail`` between batches or while waiting for the others to finish, acks, and raises the same error.
    A rank that finished posts ``ok/<rank>`` = its layout signature and waits for all.
    """

    def __init__(self, ctx: DistContext, timeout_s: float = DEFAULT_STATUS_TIMEOUT_S) -> None:
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.prefix = f"bnaudit/recalibrate/{next(_run_counter)}/"

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _failure(self) -> RankFailedError:
        store = self.ctx.store
        store.wait([self._key("failure")], timedelta(seconds=30))
        code, rank, line = store.get(self._key("failure")).decode("utf-8").split("|", 2)
        return RankFailedError(f"rank {rank} failed: {line}", int(code))

    def _peer_failed(self) -> bool:
        return bool(self.ctx.store.check([self._key("nfail")]))

    def check_peers(self) -> None:
        """Raise the shared error when another rank has failed (cheap: one store round trip)."""
        if self._peer_failed():
            err = self._failure()
            self.ctx.store.add(self._key("acks"), 1)
            self._leave_together()
            raise err

    def post_failure(self, exc: BaseException) -> RankFailedError:
        """Record this rank's failure (unless another rank's, already shared); return the shared error."""
        if isinstance(exc, RankFailedError):
            return exc
        store = self.ctx.store
        code = exc.exit_code if isinstance(exc, BnauditError) else InternalError.exit_code
        line = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, BnauditError):
            line = f"{type(exc).__name__}: {line}"
        try:
            if store.add(self._key("nfail"), 1) == 1:
                store.set(self._key("failure"), f"{code}|{self.ctx.rank}|{line}")
            shared = self._failure()
            self._wait_acks()
            self._leave_together()
        except Exception as store_exc:  # the store itself is gone: keep the local error
            log.debug("could not share the failure through the store: %s", store_exc)
            return RankFailedError(f"rank {self.ctx.rank} failed: {line}", code)
        return shared

    def _wait_acks(self) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        others = self.ctx.world_size - 1
        while time.monotonic() < deadline:
            # add(key, 0) reads a counter without changing it (and creates it when absent).
            acks = self.ctx.store.add(self._key("acks"), 0)
            failed = self.ctx.store.add(self._key("nfail"), 0)
            if acks + failed - 1 >= others:
                return
            time.sleep(_POLL_S)

    def _leave_together(self) -> None:
        """Wait until every rank is about to raise the shared error, so that all of them print it.

        torchrun's agent stops every worker as soon as one exits: a rank still sleeping or waiting then
        would be killed before its error line is printed. Leaving together narrows that to the moment
        between raising and printing. A rank that died never arrives: the wait is bounded.
        """
        store = self.ctx.store
        store.add(self._key("leaving"), 1)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline and store.add(self._key("leaving"), 0) < self.ctx.world_size:
            time.sleep(_POLL_S)

    def finish_ok(self, signature: str) -> None:
        """Post success and wait for every rank's status.

        Raises:
            RankFailedError: a rank failed, or did not report within the timeout.
            ModelMismatchError: ranks hold different models (layout signatures differ).
        """
        store = self.ctx.store
        store.set(self._key(f"ok/{self.ctx.rank}"), signature)
        keys = [self._key(f"ok/{r}") for r in range(self.ctx.world_size)]
        deadline = time.monotonic() + self.timeout_s
        while not store.check(keys):
            self.check_peers()
            if time.monotonic() > deadline:
                late = [r for r, k in enumerate(keys) if not store.check([k])]
                raise RankFailedError(f"rank(s) {late} did not finish within {self.timeout_s:.0f} s")
            time.sleep(_POLL_S)
        signatures = [store.get(k).decode("utf-8") for k in keys]
        if len(set(signatures)) != 1:
            bad = [r for r, s in enumerate(signatures) if s != signatures[0]]
            raise ModelMismatchError(
                "hold a different model (BatchNorm layers differ from rank 0's)",
                where=f"rank(s) {bad}",
                fix="run every rank with the same --model and --model-arg",
            )
