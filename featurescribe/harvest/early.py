"""The first batch's forward pass, run while a thread sets the database up.

Before a harvest knows which sequences to run (a resumed one skips those it has done) and with
which thresholds, it opens the database, creates or upgrades a new file's schema and reads each
source's state: 0.1-0.3 s on the CPU, a sixth to a half of a batch's forward pass. Meanwhile the
model runs the corpus's first batch and keeps its sites' activations. When the plan's first batch
is exactly those sequences, every source still needing each (a new harvest), they are used as if
the pass had run then; otherwise they are dropped. The pass gives up at the next layer once the
plan says so (or the setup failed), so a resumed or finished harvest loses at most a layer's work.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Callable, Iterator

from featurescribe.harvest.batches import Batch, Plan, in_range, is_member
from featurescribe.harvest.corpus import Sequence

EARLY_BYTES = 256 << 20  # no early pass when one batch's activations at all sites would take more


class Background:
    """`fn()` in a thread: `result()` waits for it and returns its value, or raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str = "harvest-setup"):
        self._value: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._t.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by result()
            self.error = err
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def value(self) -> Any:
        """The value once `done()` without an error, else None."""
        return self._value if self.done() and self.error is None else None

    def result(self) -> Any:
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self._value

    def join(self, timeout: float | None = None) -> None:
        self._t.join(timeout)


@dataclass
class EarlyBatch:
    sequences: list[Sequence]
    captures: dict | None  # site key -> activations [B, T, width] on the model's device; None: none kept

    def fits(self, batch: Batch) -> bool:
        """Is `batch` these very sequences, with every source still needing each?"""
        return (self.captures is not None and len(batch.token_ids) == len(self.sequences)
                and all(t is s.token_ids for t, s in zip(batch.token_ids, self.sequences))
                and (batch.todo is None or bool(batch.todo.all())))

    def take(self, batch: Batch) -> dict | None:
        """The activations when `batch` fits them; asked once (the first batch), then dropped."""
        captures = self.captures if self.fits(batch) else None
        self.captures = None
        return captures


def first_sequences(seqs: Iterator[Sequence], n: int,
                    index_range: tuple[int, int | None] | None) -> tuple[list[Sequence], Iterator[Sequence]]:
    """The first `n` sequences inside the index range, and the sequences again from the start
    (those before the range are read past: a harvest skips them anyway)."""
    lo, hi = index_range or (0, None)
    head = list(islice(in_range(seqs, lo, hi), n))
    return head, chain(head, seqs)


def plan_skips(plan: Plan, head: list[Sequence]) -> bool:
    """Will the plan leave out some of these sequences for some source (so its first batch differs)?"""
    return any(is_member(done, s.corpus_index) for done in plan.done_index for s in head)


def capture_bytes(harvester, n_seq: int, ctx: int) -> int:
    """Bytes of one batch's activations at all the harvester's sites."""
    size = next(harvester.model.parameters()).element_size()
    return n_seq * ctx * size * sum(site.width for site in harvester.reader.sites.values())


def early_forward(harvester, head: list[Sequence], give_up: Callable[[], bool]) -> EarlyBatch:
    """The forward pass of `head` (one batch), keeping every site's activations; none when there is
    nothing to run, the activations would be too large, or `give_up()` says so during the pass."""
    ctx = max((len(s.token_ids) for s in head), default=0)
    if not head or capture_bytes(harvester, len(head), ctx) > EARLY_BYTES or give_up():
        return EarlyBatch(head, None)
    ids, _ = harvester.pad_to_device([s.token_ids for s in head])
    return EarlyBatch(head, harvester.reader.run(ids, stop_if=give_up))
