"""``--mode sequential`` in one pass: every batch's forward held at each BatchNorm call until all arrive.

Each batch's forward runs in a thread of its own, one thread at a time (a baton passed by the coordinator,
so the forwards run in batch order and the arithmetic is that of one thread). A forward that reaches a
measured layer records its input and waits; once every batch waits at the same call, the layer's
statistics over all of them (all ranks: the same all-gather of exact sufficient statistics as population
mode) are written into its buffers, and every forward goes on normalising with them in eval mode, up to
the next layer. So each layer is measured on exactly the inputs eval mode gives it with every earlier
layer already recalibrated, for the price of one forward per batch (and one probe batch that learns the
order of the BatchNorm calls, for the early stop).

The price is memory: every batch's forward is open at once, holding its activations at the current layer
(the input, and whatever the model keeps alive across it, such as a residual branch). ``resident_batches``
bounds how many batches that may be; with more, :mod:`bnaudit.live.sequential` refines pass by pass in
constant memory instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bnaudit.errors import InputError
from bnaudit.live.accumulate import LayerAccumulator
from bnaudit.live.batches import PassSettings, limited_batches, run_one_batch, run_pass
from bnaudit.live.estimators import LayerSums
from bnaudit.live.measure import PassState, StopForward, prepare_model, set_pass_mode
from bnaudit.live.sequential import SequentialRun, set_statistics

# (layer index, call number within its forward): the point where every forward waits
Event = tuple[int, int]


@dataclass
class _Forward:
    """One batch's forward in its thread."""

    index: int
    batch: Any
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    calls: dict[int, int] = field(default_factory=dict)
    event: Event | None = None  # where it waits; None once finished
    error: BaseException | None = None


class Lockstep:
    """Runs the forwards of ``batches`` together, layer by layer (see the module docstring)."""

    def __init__(self, model: nn.Module, accs: list[LayerAccumulator], settings: PassSettings) -> None:
        self.model = model
        self.accs = accs
        self.settings = settings
        self.baton = threading.Semaphore(0)
        self.local = threading.local()
        self.abort = False
        self.stop_at: Event | None = None

    def arrive(self, layer_index: int) -> None:
        """In a forward's thread: its input at this layer is recorded; wait until the layer is set."""
        fwd: _Forward = self.local.forward
        seen = fwd.calls.get(layer_index, 0) + 1
        fwd.calls[layer_index] = seen
        fwd.event = (layer_index, seen)
        self.baton.release()
        fwd.go.acquire()
        if self.abort or fwd.event == self.stop_at:
            raise StopForward

    def _body(self, fwd: _Forward) -> None:
        fwd.go.acquire()
        self.local.forward = fwd
        try:
            if not self.abort:
                with torch.inference_mode():
                    run_one_batch(self.model, fwd.batch, fwd.index, self.settings)
        except StopForward:
            pass
        except BaseException as exc:  # handed to the coordinator, raised there
            fwd.error = exc
        fwd.event = None
        self.baton.release()

    def _step(self, forwards: list[_Forward]) -> list[_Forward]:
        """Let every open forward run to its next layer (or its end); the ones now waiting."""
        for fwd in forwards:
            fwd.go.release()
            self.baton.acquire()
        failed = [f.error for f in forwards if f.error is not None]
        if failed:
            raise failed[0]
        return [f for f in forwards if f.event is not None]

    def run(self, batches: list[tuple[int, Any]], set_layer: Callable[[int], None], state: PassState) -> None:
        """Every batch's forward, with ``set_layer(i)`` writing layer i's statistics at each meeting.

        Raises:
            InputError: a batch raised, or the forwards reached different layers (data-dependent flow).
        """
        forwards = [_Forward(index, batch) for index, batch in batches]
        threads = [threading.Thread(target=self._body, args=(f,), daemon=True) for f in forwards]
        state.arrive = self.arrive
        for thread in threads:
            thread.start()
        try:
            open_forwards = self._step(forwards)
            while open_forwards:
                events = {f.event for f in open_forwards}
                if len(events) > 1 or len(open_forwards) < len(forwards):
                    raise InputError(
                        "the batches' forwards call the BatchNorm layers in different orders",
                        where="--mode sequential",
                        fix="use --resident-batches 0 (refinement passes allow data-dependent control flow)",
                    )
                layer_index = next(iter(events))[0]  # type: ignore[index]
                set_layer(layer_index)
                open_forwards = self._step(open_forwards)
        finally:
            self.abort = True
            for fwd in forwards:
                fwd.go.release()
            for thread in threads:
                thread.join()
            state.arrive = None


def _load(batches: Iterable[Any], run: SequentialRun) -> tuple[list[tuple[int, Any]], int, int] | None:
    """This rank's batches in memory, (index, batch), with their count and samples (-1: unknown); None when
    there are more than ``run.resident_batches``."""
    loaded: list[tuple[int, Any]] = []
    samples = 0
    for index, batch, size in limited_batches(batches, run.settings):
        if len(loaded) >= run.resident_batches:
            return None
        loaded.append((index, batch))
        samples = -1 if size is None or samples < 0 else samples + size
    return loaded, len(loaded), samples


class _Channels:
    """The failure-sharing channel of the current step (loading, each meeting, the end): one per step."""

    def __init__(self, run: SequentialRun, accs: list[LayerAccumulator]) -> None:
        self.run = run
        self.layout = ";".join(f"{a.name}:{a.channels}" for a in accs)
        self.current = run.new_channel()

    def finish(self, step: str) -> None:
        if self.current is not None:
            self.current.finish_ok(f"{self.layout}|{step}")
        self.current = self.run.new_channel()

    def failed(self, exc: BaseException) -> BaseException:
        return exc if self.current is None else self.current.post_failure(exc)


def _probe(model: nn.Module, first: tuple[int, Any], accs: list[LayerAccumulator], state: PassState,
           run: SequentialRun) -> Event | None:  # fmt: skip
    """One eval-mode forward of the first batch: the last BatchNorm call (for the early stop)."""
    settings = replace(run.settings, check_peers=None, progress=None, max_batches=None, max_samples=None)
    with torch.inference_mode():
        run_pass(model, [first[1]], state, settings)
    for acc in accs:
        acc.reset()
    return state.stop_at if run.stop_after_last_bn else None


def measure_lockstep(
    model: nn.Module, batches: Iterable[Any], accs: list[LayerAccumulator], run: SequentialRun
) -> tuple[list[LayerSums], int, int | None] | None:
    """The sequential statistics in one pass (merged over the ranks, with batches and samples used), or None
    when some rank's batches do not fit (``run.resident_batches``) or a layer needs the fallback hooks.

    Raises:
        InputError: a batch raised (on any rank), or the forwards reached the layers in different orders.
    """
    state = PassState(enabled=run.stop_after_last_bn)
    saved = prepare_model(model, accs, state, run.channels_last)
    channels = _Channels(run, accs)
    try:
        set_pass_mode(model, accs, state, eval_mode=True)
        try:
            found = _load(batches, run)
            stop_at = _probe(model, found[0][0], accs, state, run) if found and found[1] else None
            channels.finish("loaded")
            if not run.agree(found is not None and found[1] > 0 and saved.tap.fallbacks == 0):
                return None
            assert found is not None
            loaded, used, samples = found
            step = Lockstep(model, accs, run.settings)
            step.stop_at = stop_at

            def set_layer(layer_index: int) -> None:
                channels.finish(f"layer {layer_index}")
                # Only this layer's sums are needed (the others' host copies would make each meeting O(L)).
                mine = [
                    a.sums() if i == layer_index else LayerSums.empty(a.channels) for i, a in enumerate(accs)
                ]
                merged = run.reduce(mine, (0, 0))[0]
                set_statistics(accs[layer_index], merged[layer_index])

            step.run(loaded, set_layer, state)
            local = [acc.sums() for acc in accs]
            channels.finish("done")
        except BaseException as exc:
            raise channels.failed(exc) from None
        return run.reduce(local, (used, samples))
    finally:
        saved.restore()
