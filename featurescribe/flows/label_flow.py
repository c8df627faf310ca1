"""The label flow: sample -> explain -> score, chunk by chunk, resumable.

    label_flow(db="f.duckdb", source="6-mlp", features="alive", explainer="openai:gpt-4o-mini",
               simulator="openai:gpt-4o-mini", task_runner="dask", workers=4)

The flow's own process is the only one that touches the database. For each chunk of features
(`--chunk-size`, a few hundred) it samples and loads the examples (`prepare_chunk`), hands them
to a task that makes the LLM calls (`compute_chunk`, async inside), and writes what comes back
in one transaction (`write_chunk`), one chunk at a time, as results arrive. While a chunk
computes, the next one is prepared.

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
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections import deque
from contextlib import ExitStack
from typing import Any

from featurescribe.flows.prefect_env import api_url, configure_prefect

configure_prefect()

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from featurescribe.errors import FeaturescribeError  # noqa: E402
from featurescribe.flows import label_core  # noqa: E402
from featurescribe.flows.label_core import (  # noqa: E402
    DEFAULT_CHUNK_SIZE, ChunkResult, LabelParams, LabelSummary, PreparedChunk)
from featurescribe.flows.runners import RUNNERS, make_task_runner, workers_see_api  # noqa: E402
from featurescribe.flows.runs import recorded_run  # noqa: E402
from featurescribe.llm.base import BudgetExceeded, parse_backend_spec  # noqa: E402

# cached answers of unfinished earlier runs handed to each Dask chunk at most
RESUME_CACHE_LIMIT = 20_000


def _transient(task, task_run, state) -> bool:
    """Retry a chunk unless it failed for the user's reason (bad key, ...) or the budget."""
    try:
        state.result()
    except (FeaturescribeError, BudgetExceeded):
        return False
    except Exception:
        return True
    return False


@task(name="label-chunk", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_transient)
def compute_chunk_task(prepared: PreparedChunk, params: LabelParams, run_id: str, budget: Any,
                       store: Any, cached: dict | None, global_limits: dict | None):
    """Explain and score one chunk (LLM calls only, no database). Returns (ChunkResult, the
    MemoryCallStore of its calls when it had no database-backed store)."""
    from featurescribe.flows.limits import chunk_slots

    memory = None
    if store is None:
        from featurescribe.store.memory_calls import MemoryCallStore

        memory = store = MemoryCallStore(cached)

    if global_limits:  # never more requests in flight than the global limit has slots
        cap = min(lim.limit for lim in global_limits.values())
        params = dataclasses.replace(params, concurrency=max(1, min(params.concurrency, cap)))

    async def main() -> ChunkResult:
        clients = label_core._make_clients(params, store, budget, run_id)
        try:
            async with chunk_slots(list(clients), global_limits):
                return await label_core.compute_chunk(prepared, params, store=store, budget=budget,
                                                      run_id=run_id, clients=clients)
        finally:
            for c in {id(c): c for c in clients if c is not None}.values():
                await c.aclose()

    result = asyncio.run(main())
    return result, (memory.outgoing() if memory is not None else None)


def label_params(**options: Any) -> LabelParams:
    """LabelParams from the `featurescribe label` options (argparse names), defaults filled in."""
    from featurescribe.flows.label_command import add_label_arguments, params_from_args

    parser = argparse.ArgumentParser(add_help=False)
    add_label_arguments(parser)
    defaults = vars(parser.parse_args(["--source", str(options.get("source") or "")]))
    unknown = set(options) - set(defaults)
    if unknown:
        raise FeaturescribeError(f"unknown label option(s): {', '.join(sorted(unknown))}")
    return params_from_args(argparse.Namespace(**{**defaults, **options}))


def _uses_llm(spec: str) -> bool:
    return parse_backend_spec(spec)[0] in ("openai", "anthropic", "local")


@flow(name="label")
def label_flow(db: str, source: str, features: str = "all", explainer: str = "baseline:tokens",
               simulator: str = "lexical", scorers: str = "simulation", candidates: int = 1,
               concurrency: int = 16, budget_usd: float | None = None, no_cache: bool = False,
               method: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE,
               explain_windows: int | None = None, window: int = 32, windows: str = "", seed: int = 0,
               redo: bool = False, logit_lens: int = 0,
               task_runner: str = "thread", workers: int = 2, dask_address: str | None = None,
               no_progress: bool = False, batch: bool = False, no_wait: bool = False,
               batch_retry: str = "batch", batch_poll: float = 30.0) -> LabelSummary | None:
    """Label the features of `source` (options as `featurescribe label`); returns the summary
    (None when `batch` and `no_wait` left batches running: a later run collects them)."""
    if task_runner not in RUNNERS:
        raise FeaturescribeError(f"unknown task runner {task_runner!r}: use {' or '.join(RUNNERS)}")
    params = label_params(
        source=source, features=features, explainer=explainer, simulator=simulator, scorers=scorers,
        candidates=candidates, concurrency=concurrency, budget_usd=budget_usd, no_cache=no_cache,
        method=method, chunk_size=chunk_size, explain_windows=explain_windows, window=window,
        windows=windows, seed=seed, redo=redo, logit_lens=logit_lens)
    label_core.check_backends(params)
    if batch:  # provider batch APIs first, then the label run from the cache (flows/label_batch.py)
        from featurescribe.flows.label_batch import batch_options_from_args, run_label_batch

        options = batch_options_from_args(argparse.Namespace(
            batch=True, no_wait=no_wait, batch_retry=batch_retry, batch_poll=batch_poll,
            no_progress=no_progress))
        return run_label_batch(db, params, options, progress=not no_progress).summary
    record = {**params.as_dict(), "task_runner": task_runner,
              "workers": workers if task_runner == "dask" else None, "dask_address": dask_address}
    with recorded_run(db, "label", record) as run:
        summary = _label(db, params, run.run_id, task_runner=task_runner, workers=workers,
                         dask_address=dask_address, progress=not no_progress)
        if summary.stopped_at_budget:
            run.status, run.note = "stopped", summary.budget_message
    return summary


def _label(db: str, params: LabelParams, run_id: str, *, task_runner: str, workers: int,
           dask_address: str | None, progress: bool) -> LabelSummary:
    from featurescribe.flows import limits
    from featurescribe.llm.budget import Budget
    from featurescribe.progress import Progress
    from featurescribe.store import runs as runs_sql
    from featurescribe.store.connection import open_db
    from featurescribe.store.llm_calls import CallStore
    from featurescribe.semantic.embed import embed_new_labels

    dask = task_runner == "dask"
    con = open_db(db, create=False)
    store = None
    try:
        all_ids = label_core.select_features(con, params.source_id, params.features, skip_done=False)
        ids = label_core.select_features(con, params.source_id, params.features,
                                         explainer=params.explainer, skip_done=params.skip_done)
        summary = LabelSummary(run_id, params.source_id, params.explainer, params.simulator,
                               n_selected=len(all_ids), already_done=len(all_ids) - len(ids))
        in_flight_max = max(1, workers) if dask else 1
        llm_specs = [s for s in (params.explainer, params.simulator) if _uses_llm(s)]
        global_limits = None
        if llm_specs and limits.enabled() and api_url():
            global_limits = limits.ensure_global_limits(llm_specs, params.concurrency) or None
        chunk_params = params
        if dask:  # each worker's share (of this run's share of the global limit, with a server)
            chunk_params = dataclasses.replace(params, concurrency=max(1, params.concurrency // in_flight_max))
        budget = Budget(params.budget_usd)
        cached = None
        if dask:
            cached = runs_sql.resume_cache_entries(con, params.source_id, RESUME_CACHE_LIMIT) if llm_specs else {}
        else:
            store = CallStore(con)

        pending = label_core.chunks(ids, params.chunk_size)

        def prepare_next() -> PreparedChunk | None:
            chunk_ids = next(pending, None)
            if chunk_ids is None:
                return None
            if budget.exhausted:
                summary.not_done += chunk_ids
                summary.stopped_at_budget = True
                return prepare_next()
            return label_core.prepare_chunk(con, params, chunk_ids)

        def submit(runner, prepared: PreparedChunk):
            chunk_budget: Any = budget
            if dask:  # a worker's share of what is left (a number: a Budget does not pickle)
                chunk_budget = None if budget.limit_usd is None else \
                    (budget.remaining_usd or 0.0) / in_flight_max
            name = f"label-chunk-{prepared.feature_ids[0]}-{prepared.feature_ids[-1]}"
            # quote: Prefect does not walk the examples looking for futures (in this process;
            # a quoted value does not survive Dask's pickling, which walks them anyway)
            q = (lambda v: v) if dask else quote
            return runner.submit(compute_chunk_task.with_options(task_run_name=name), parameters={
                "prepared": q(prepared), "params": chunk_params, "run_id": run_id,
                "budget": chunk_budget, "store": q(store), "cached": cached,
                "global_limits": global_limits})

        def write(prepared: PreparedChunk, result: ChunkResult, calls) -> None:
            if store is not None:
                store.flush()  # this chunk's ledger rows before its results
            counts = label_core.write_chunk(con, result, run_id=run_id, calls=calls)
            if result.explanations:  # labels land with their embeddings (semantic search, browse)
                embed_new_labels(con, result.source_id)
            summary.add(result, counts)
            if calls is not None:
                budget.add(result.spent_usd)

        with ExitStack() as stack:
            if dask:
                stack.enter_context(workers_see_api())
            runner = stack.enter_context(make_task_runner(
                task_runner, threads=1, workers=workers, address=dask_address))
            bar = stack.enter_context(Progress("label", total=len(ids), unit="features", enabled=progress))
            in_flight: deque = deque()
            ahead = prepare_next()
            while ahead is not None or in_flight:
                while ahead is not None and len(in_flight) < in_flight_max:
                    if ahead.examples:
                        in_flight.append((ahead, submit(runner, ahead)))
                    else:  # dead or rare features only: nothing to compute
                        write(ahead, ChunkResult(ahead.source_id, skipped=list(ahead.skipped)), None)
                        bar.advance(len(ahead.feature_ids))
                    ahead = prepare_next()
                if not in_flight:
                    continue
                prepared, future = in_flight.popleft()
                result, calls = future.result()
                write(prepared, result, calls)
                bar.advance(len(prepared.feature_ids))
        if store is not None:
            store.close()
            store = None
        summary.stopped_at_budget |= budget.stopped
        if summary.stopped_at_budget:
            summary.budget_message = (
                f"stopped at the budget: ${params.budget_usd or 0:.4f} spent or reached; "
                f"{len(summary.not_done)} feature(s) left for a later run")
        totals = runs_sql.label_run_totals(con, run_id)
        summary.spent_usd, summary.llm_calls = totals["spent_usd"], totals["llm_calls"]
        summary.cached_calls, summary.mean_score = totals["cached_calls"], totals["mean_score"]
        return summary
    finally:
        if store is not None:
            store.close()
        con.close()


def flow_options(args: argparse.Namespace) -> dict[str, Any]:
    """The label flow's parameters from parsed `featurescribe label` options."""
    import inspect

    names = inspect.signature(label_flow.fn).parameters
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def preflight(db: str, options: dict[str, Any]) -> LabelParams:
    """The checks the flow makes first, made before any flow run starts, so that a user error
    ends in one line and no failed run: options, API keys, the database, source and features."""
    from featurescribe.store.connection import open_db

    runner_keys = ("db", "task_runner", "workers", "dask_address", "no_progress")
    if options.get("task_runner", "thread") not in RUNNERS:
        raise FeaturescribeError(f"unknown task runner {options['task_runner']!r}: use {' or '.join(RUNNERS)}")
    if options.get("task_runner") == "dask" and int(options.get("workers") or 0) < 1:
        raise FeaturescribeError("--workers must be at least 1")
    params = label_params(**{k: v for k, v in options.items() if k not in runner_keys})
    label_core.check_backends(params)
    con = open_db(db, read_only=True, create=False)
    try:
        label_core.select_features(con, params.source_id, params.features, skip_done=False)
    finally:
        con.close()
    return params


def run_label_command(args: argparse.Namespace) -> LabelSummary:
    """`featurescribe label` (without --batch): the label flow, in this process."""
    options = flow_options(args)
    preflight(options["db"], options)
    return label_flow(**options)
