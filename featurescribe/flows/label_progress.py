"""A label run's progress, per feature: the bar or plain lines (progress.py), and in a Prefect
flow the flow run's progress artifact, with the calls paid for and the dollars spent so far.

A chunk computing in this process reports each feature as its last score arrives (or as it
fails); a chunk computed elsewhere (a Dask worker) counts when its result is written. Either way
`chunk_written` brings the count to the chunk's size, so skipped and budget-stopped features
count as done for this run too.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from featurescribe.progress import Progress

ARTIFACT_EVERY_S = 5.0
log = logging.getLogger(__name__)


class LabelProgress:
    """`feature_done` (any thread), `chunk_written` and `refresh` (the flow's thread)."""

    def __init__(self, bar: Progress, budget: Any, *, total: int, artifact_key: str | None = None):
        self.bar, self.budget, self.total = bar, budget, total
        self.bar.info = self.info
        self._lock = threading.Lock()
        self._reported: dict[int, int] = {}  # chunk (its first feature) -> features reported
        self._extra_calls = 0  # calls of chunks computed elsewhere, counted when written
        self._artifact_key = artifact_key
        self._artifact_id = None
        self._artifact_at = 0.0

    @property
    def calls(self) -> int:
        return self.budget.billed_calls + self._extra_calls

    def info(self) -> str:
        return f"{self.calls:,} paid calls, ${self.budget.spent_usd:.4f}"

    def feature_done(self, chunk_key: int) -> None:
        with self._lock:
            self._reported[chunk_key] = self._reported.get(chunk_key, 0) + 1
        self.bar.advance(1)

    def chunk_written(self, feature_ids: list[int], ledger_rows: int = 0) -> None:
        with self._lock:
            left = len(feature_ids) - self._reported.pop(feature_ids[0], 0)
            self._extra_calls += ledger_rows
        if left > 0:
            self.bar.advance(left)
        self.refresh(force=False)

    def description(self) -> str:
        return f"{self.bar.done:,.0f} of {self.total:,} features, {self.info()}"

    def refresh(self, force: bool = False) -> None:
        """The flow run's progress artifact (at most every few seconds unless `force`)."""
        now = time.monotonic()
        if self._artifact_key is None or (not force and now - self._artifact_at < ARTIFACT_EVERY_S):
            return
        self._artifact_at = now
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        pct = 100.0 * self.bar.done / max(1, self.total)
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(pct, key=self._artifact_key,
                                                             description=self.description())
            else:
                update_progress_artifact(self._artifact_id, pct, description=self.description())
        except Exception as err:  # the UI's view is a courtesy: a run never fails for it, nor waits
            # on it again (Prefect's client retries for about a minute: a server that went away
            # held the flow that long at every update)
            log.debug("progress artifact not updated, and no longer updated in this run: %s", err)
            self._artifact_key = None
