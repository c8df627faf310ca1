"""A label run: the run context every way of running the pipeline shares, and the plain loop.

`LabelRun` is what the plain loop (`run_label`), the Prefect label flow (flows/label_flow.py) and
the batch phases (flows/label_batch.py) have in common: the run id and its `runs` row, the budget,
the database-backed call store, the LLM clients (closed at the end), the budget message and the
run's totals read back from the ledger.

A run holds the database only while it writes: `run.db` is a `store.connection.Database`, opened
for each chunk's sampling (`prepare`), each chunk's results (`write`), each batch of ledger rows
and each cache read, and closed in between, so readers and other runs get in between.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from featurescribe.flows.label_core import (
    ChunkCounts,
    ChunkResult,
    SkippedFeature,
    chunks,
    compute_chunk,
    llm_clients,
    prepare_chunk,
    select_features,
    write_chunk,
)
from featurescribe.flows.label_checks import check_steering
from featurescribe.flows.label_options import LabelOptions
from featurescribe.interrupts import run_cancellable
from featurescribe.statuses import ExitStatus, RunStatus


@dataclass
class LabelSummary:
    run_id: str
    source_id: str
    explainer: str
    simulator: str
    n_selected: int = 0
    already_done: int = 0
    labelled: list[int] = field(default_factory=list)
    skipped: list[SkippedFeature] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    not_done: list[int] = field(default_factory=list)
    explanations_written: int = 0
    scores_written: int = 0
    spent_usd: float = 0.0
    llm_calls: int = 0
    cached_calls: int = 0
    stopped_at_budget: bool = False
    budget_message: str | None = None
    mean_score: float | None = None
    broken: str | None = None  # the circuit breaker stopped the run (its one line)
    broken_exit: int = ExitStatus.ERROR

    def add(self, result: ChunkResult, counts: ChunkCounts) -> None:
        self.labelled += result.labelled
        self.skipped += result.skipped
        self.failed.update(result.failed)
        self.not_done += result.not_done
        self.explanations_written += counts.explanations
        self.scores_written += counts.scores
        self.stopped_at_budget |= result.stopped_at_budget

    def leave_for_later(self, feature_ids: list[int]) -> None:
        """Features a run did not start because the budget was spent."""
        self.not_done += feature_ids
        self.stopped_at_budget = True

    @property
    def run_status(self) -> RunStatus:
        """`runs.status`: 'failed' when features failed and none was labelled, 'partial' when some
        failed, 'stopped' at the budget, else 'completed'."""
        if self.broken or (self.failed and not self.labelled):
            return RunStatus.FAILED
        if self.failed:
            return RunStatus.PARTIAL
        return RunStatus.STOPPED if self.stopped_at_budget else RunStatus.COMPLETED

    @property
    def exit_status(self) -> ExitStatus:
        if self.broken:
            return ExitStatus(self.broken_exit)
        return {RunStatus.FAILED: ExitStatus.ERROR, RunStatus.PARTIAL: ExitStatus.PARTIAL}.get(
            self.run_status, ExitStatus.OK)

    def status_note(self) -> str | None:
        """What `runs.error` says beside the status: the counts, and why features failed."""
        if self.broken:
            return self.broken
        if not self.failed:
            return self.budget_message
        first = self.failed[min(self.failed)]
        note = (f"{len(self.labelled)} labelled, {len(self.failed)} failed, {len(self.skipped)} skipped, "
                f"{len(self.not_done)} left for later; first failure (feature {min(self.failed)}): {first}")
        return note + (f"; {self.budget_message}" if self.budget_message else "")


def check_backends(options: LabelOptions) -> None:
    """Fail before any work when an LLM backend cannot be used (no API key, unknown backend,
    a local model that is not there)."""
    from featurescribe.llm.registry import check_backend

    for spec in {options.explainer, options.simulator}:
        check_backend(spec)


class LabelRun:
    """One run over a database opened per piece of work: see the module docstring."""

    def __init__(self, db, options: LabelOptions, run_id: str, *, call_store: bool = True):
        from featurescribe.llm.budget import Budget
        from featurescribe.store.llm_calls import CallStore

        self.db, self.options, self.run_id = db, options, run_id
        self.budget = Budget(options.budget_usd)
        self.store = CallStore(db) if call_store else None

    def prepare(self, chunk_ids: list[int]):
        """Sample and load one chunk's examples (one short opening of the database)."""
        with self.db.connect() as con:
            return prepare_chunk(con, self.options, chunk_ids)

    def write(self, result: ChunkResult, calls=None) -> ChunkCounts:
        """Write one chunk's results, after its ledger rows (one short opening), then embed its
        labels (the database closed while the embedder computes)."""
        from featurescribe.native_memory import return_freed_memory
        from featurescribe.semantic.embed import embed_new_labels

        if self.store is not None:
            self.store.flush()
        with self.db.connect() as con:
            counts = write_chunk(con, result, run_id=self.run_id, calls=calls, embed=False)
        if result.explanations:
            ids = [e.explanation.feature_id for e in result.explanations]
            embed_new_labels(self.db, result.source_id, (min(ids), max(ids)))
        return_freed_memory()
        return counts

    def summary(self, ids: list[int], n_selected: int) -> LabelSummary:
        o = self.options
        return LabelSummary(self.run_id, o.source_id, o.explainer, o.simulator,
                            n_selected=n_selected, already_done=n_selected - len(ids))

    def clients(self):
        """The run's LLM clients (async context manager), recording to its call store."""
        return llm_clients(self.options, store=self.store, budget=self.budget, run_id=self.run_id)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def finish(self, summary: LabelSummary) -> LabelSummary:
        """Close the call store, then fill in the budget message and the totals."""
        from featurescribe.store.runs import label_run_totals

        self.close()
        summary.stopped_at_budget |= self.budget.stopped
        if summary.stopped_at_budget:
            summary.budget_message = (
                f"stopped at the budget: ${self.options.budget_usd or 0:.4f} spent or reached; "
                f"{len(summary.not_done)} feature(s) left for a later run")
        with self.db.connect() as con:
            totals = label_run_totals(con, self.run_id)
        summary.spent_usd, summary.llm_calls = totals["spent_usd"], totals["llm_calls"]
        summary.cached_calls, summary.mean_score = totals["cached_calls"], totals["mean_score"]
        return summary


@contextmanager
def open_label_run(db, options: LabelOptions, run_id: str, *, call_store: bool = True) -> Iterator[LabelRun]:
    """A LabelRun (on a `Database`) whose call store is closed however the block ends."""
    run = LabelRun(db, options, run_id, call_store=call_store)
    try:
        yield run
    finally:
        run.close()


def selected_features(db, options: LabelOptions, *, steering: bool = False) -> tuple[list[int], int]:
    """(the features this run labels, how many the spec selects before leaving out done ones),
    read in one short opening of `db` (a `Database`); `steering`: check the steering scorers too."""
    with db.connect() as con:
        every = select_features(con, options.source_id, options.features, skip_done=False)
        todo = select_features(con, options.source_id, options.features, explainer=options.explainer,
                               skip_done=options.skip_done)
        if steering:
            check_steering(con, options)
    return todo, len(every)


def run_database(db: str):
    """The `Database` a label run writes through: opened per piece of work, its writes waiting
    `run_lock_timeout()` for other processes, its DuckDB memory bounded (store/memory.py; unbounded,
    the checkpoint at a closing rewrote row groups in memory, ~300 MB every few 10k features)."""
    from featurescribe.store.connection import Database, open_db, run_lock_timeout
    from featurescribe.store.memory import RUN_HEADROOM_MB

    open_db(db, create=False).close()  # a missing, locked or too new file: one line, now
    return Database(db, lock_timeout=run_lock_timeout(), memory_headroom_mb=RUN_HEADROOM_MB)


def run_label(db: str, options: LabelOptions, *, progress: bool = True) -> LabelSummary:
    """A whole label run in this process, without Prefect: prepare/compute/write chunk by chunk.

    Recorded in `runs` (flow 'label'; status as `LabelSummary.run_status`, 'interrupted' on a
    signal, 'failed' on an error).
    """
    from featurescribe.flows.run_record import recorded_run

    check_backends(options)
    database = run_database(db)
    ids, n_selected = selected_features(database, options, steering=True)
    with recorded_run(database, "label", options.as_dict()) as record, \
            open_label_run(database, options, record.run_id) as run:
        summary = run.summary(ids, n_selected)
        run_cancellable(_loop(run, ids, summary, progress))
        run.finish(summary)
        record.status, record.note = summary.run_status, summary.status_note()
    return summary


async def _loop(run: LabelRun, ids: list[int], summary: LabelSummary, progress: bool) -> None:
    from featurescribe.flows.label_progress import LabelProgress
    from featurescribe.progress import Progress

    async with run.clients() as clients:
        with Progress("label", total=len(ids), unit="features", enabled=progress) as bar:
            per_feature = LabelProgress(bar, run.budget, total=len(ids))
            for chunk_ids in chunks(ids, run.options.chunk_size):
                if run.budget.exhausted:
                    summary.leave_for_later(chunk_ids)
                    continue
                prepared = run.prepare(chunk_ids)
                result = await compute_chunk(prepared, run.options, clients=clients, store=run.store,
                                             budget=run.budget, run_id=run.run_id, progress=per_feature)
                summary.add(result, run.write(result))
                per_feature.chunk_written(prepared.feature_ids)


__all__ = ["LabelRun", "LabelSummary", "check_backends", "open_label_run", "run_database", "run_label",
           "selected_features"]
