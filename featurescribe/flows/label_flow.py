"""The label flow: sample -> explain -> score, chunk by chunk, resumable.

    label_flow(db="f.duckdb", source="6-mlp", features="alive", explainer="openai:gpt-4o-mini",
               simulator="openai:gpt-4o-mini", task_runner="dask", workers=4)

Its parameters are `db` and the fields of `LabelOptions` (flows/label_options.py), the options
of `featurescribe label`. The flow's own process is the only one of the run that touches the
database, and it opens it only for each short piece of work (flows/label_run.py). For
each chunk of features (`--chunk-size`, a few hundred) it samples and loads the examples
(`prepare_chunk`), hands them to a task that makes the LLM calls (`compute_chunk`, async inside),
and writes what comes back in one transaction (`write_chunk`), one chunk at a time, as results
arrive. While a chunk computes, the next one is prepared.

- `task_runner="thread"` (default): chunk tasks run in this process, one at a time with the
  whole `--concurrency`; their LLM calls record to the run's database-backed CallStore, so every
  answer reaches the response cache within a second.
- `task_runner="dask"`: chunk tasks run on a Dask cluster (`workers` local processes, or the
  cluster at `dask_address`), one per worker at a time; each worker records to a
  `MemoryCallStore` that comes back with the chunk and is written in the chunk's transaction.
  `--concurrency` is shared out between the workers.

Resume: features that already have a chosen, scored explanation by the explainer are left out
(`select_features(skip_done=True)`), so re-running a killed run labels only what is missing, and
the response cache answers the calls the killed run had already paid for.

Retries: a chunk task that fails for a transient reason (anything but a user error or the
budget) is run again by Prefect (2 retries); answers it already had come from the cache.

Prefect's settings are made by the entry point (`featurescribe`, tests) with
`prefect_env.configure_prefect()`, not by importing this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.states import Failed, State

from featurescribe.errors import beyond_retrying
from featurescribe.flows import label_core
from featurescribe.flows.call_outcomes import record_call_outcomes
from featurescribe.flows.label_checks import check_steering
from featurescribe.flows.label_chunks import ChunkPipeline
from featurescribe.flows.label_core import ChunkResult, PreparedChunk
from featurescribe.flows.label_options import LabelOptions, flow_signature
from featurescribe.flows.label_run import LabelSummary, check_backends, open_label_run, run_database, \
    selected_features
from featurescribe.flows.run_record import recorded_run
from featurescribe.interrupts import Interrupted, ours_in_flow, run_cancellable
from featurescribe.llm.base import BudgetExceeded
from featurescribe.llm.breaker import BackendBroken
from featurescribe.statuses import RunStatus


def _transient(task, task_run, state) -> bool:
    """Retry a chunk unless it failed for the user's reason (bad key, ...), a full disk or the budget."""
    try:
        state.result()
    except BudgetExceeded:
        return False
    except Exception as err:
        return not beyond_retrying(err)
    return False


@task(name="label-chunk", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_transient)
def compute_chunk_task(prepared: PreparedChunk, options: LabelOptions, run_id: str, budget: Any,
                       store: Any, cached: dict | None, global_limits: dict | None, progress: Any = None):
    """Explain and score one chunk (LLM calls only, no database). Returns (ChunkResult, the
    MemoryCallStore of its calls when it had no database-backed store). `progress`: the run's
    LabelProgress, in this process only."""
    from featurescribe.flows.global_limits import chunk_slots

    memory = None
    if store is None:
        from featurescribe.store.memory_calls import MemoryCallStore

        memory = store = MemoryCallStore(cached)
    if global_limits:  # never more requests in flight than the global limit has slots
        cap = min(lim.limit for lim in global_limits.values())
        options = dataclasses.replace(options, concurrency=max(1, min(options.concurrency, cap)))
    budget = label_core.as_budget(budget)

    # clients (and their SDK's connection pool) per chunk: each chunk runs in its own event loop,
    # and an httpx pool cannot outlive its loop. Measured against the fake server: 23 ms to build
    # and up to --concurrency new connections per chunk, under 1% of a 256-feature chunk's calls
    async def main() -> ChunkResult:
        async with label_core.llm_clients(options, store=store, budget=budget, run_id=run_id) as clients:
            async with chunk_slots(clients.distinct(), global_limits):
                return await label_core.compute_chunk(prepared, options, clients=clients, store=store,
                                                      budget=budget, run_id=run_id, progress=progress)

    try:
        result = run_cancellable(main())  # a signal cancels its calls (featurescribe/interrupts.py)
    except BackendBroken as err:  # a result, not a task failure: the flow stops with one line
        result = ChunkResult(prepared.source_id, broken=str(err), broken_exit=int(err.exit_code))
    except (asyncio.CancelledError, Interrupted):
        if memory is None:  # in the flow's own process: its calls are in the database already
            raise
        # a Dask worker the stopping flow cancelled: hand back the answers paid for so far
        result = ChunkResult(prepared.source_id, not_done=[fe.feature_id for fe in prepared.examples],
                             interrupted=True)
    return result, (memory.outgoing() if memory is not None else None)


def _label_flow(db: str, **fields: Any) -> LabelSummary | State | None:
    """Label the features of `source` (options as `featurescribe label`); returns the summary
    (None when `batch` and `no_wait` left batches running: a later run collects them), inside a
    Failed state when the run failed (`labelled_by_flow` takes it out)."""
    options = LabelOptions(**fields)
    check_backends(options)
    if options.batch:  # provider batch APIs first, then the label run from the cache
        from featurescribe.flows.label_batch import run_label_batch

        return run_label_batch(db, options).summary
    record = {**options.as_dict(), "task_runner": options.task_runner,
              "workers": options.workers if options.task_runner == "dask" else None,
              "dask_address": options.dask_address}
    database = run_database(db)
    with ours_in_flow(), recorded_run(database, "label", record) as run:
        summary = _label(database, options, run.run_id)
        run.status, run.note = summary.run_status, summary.status_note()
    record_call_outcomes(database, run.run_id)  # a scheduled run (serve) keeps them too
    return _as_state(summary)


def _as_state(summary: LabelSummary) -> LabelSummary | State:
    """A run that failed (no feature labelled, or a backend's breaker) ends Failed in Prefect, as
    `runs.status` and the exit status say; its summary travels in the state."""
    if summary.run_status != RunStatus.FAILED:
        return summary
    return Failed(message=summary.status_note() or "the label run failed", data=summary)


def labelled_by_flow(**params: Any) -> LabelSummary | None:
    """`label_flow(**params)`'s summary, also of a run that failed (a Failed state, which calling
    the flow plainly would raise as a bare `FailedRun`); an error the run raised goes on."""
    outcome = label_flow(**params, return_state=True).result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


# the flow's parameters are made from LabelOptions (declared once, there)
_label_flow.__signature__ = flow_signature(db=str)
label_flow = flow(name="label")(_label_flow)


def _label(database, options: LabelOptions, run_id: str) -> LabelSummary:
    ids, n_selected = selected_features(database, options)
    dask = options.task_runner == "dask"
    with open_label_run(database, options, run_id, call_store=not dask) as run:
        summary = run.summary(ids, n_selected)
        try:
            ChunkPipeline(run, summary, compute_chunk_task).label(ids)
        except BackendBroken as err:
            summary.broken, summary.broken_exit = str(err), int(err.exit_code)
        return run.finish(summary)


def preflight(db: str, options: LabelOptions) -> None:
    """The checks the flow makes first, made before any flow run starts, so that a user error
    ends in one line and no failed run: API keys, the database, source and features."""
    from featurescribe.store.connection import open_db

    check_backends(options)
    con = open_db(db, read_only=True, create=False)
    try:
        label_core.select_features(con, options.source_id, options.features, skip_done=False)
        check_steering(con, options)
    finally:
        con.close()


def run_label_flow(db: str, options: LabelOptions) -> LabelSummary:
    """`featurescribe label` (without --batch): the label flow, in this process."""
    from featurescribe.flows.prefect_env import check_prefect_server

    preflight(db, options)
    check_prefect_server()
    return labelled_by_flow(db=db, **dataclasses.asdict(options))
