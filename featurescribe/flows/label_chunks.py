"""The label flow's chunk loop: prepare the next chunk while earlier ones compute on the task
runner, write each result as it comes back (this process is the run's one writer; it opens the
database for each chunk's sampling and each chunk's results, and closes it in between).

Progress is per feature (flows/label_progress.py). A signal (or any error) on the way out cancels
the chunks still computing in this process (interrupts.stop_running), so the task runner's
threads end at once instead of finishing their chunk's calls."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from contextlib import ExitStack
from typing import Any

from featurescribe.flows import label_core
from featurescribe.flows.label_core import ChunkResult, PreparedChunk
from featurescribe.flows.label_progress import LabelProgress
from featurescribe.flows.label_run import LabelRun, LabelSummary
from featurescribe.interrupts import as_interruption, stop_running
from featurescribe.llm.breaker import BackendBroken

# cached answers of unfinished earlier runs handed to each Dask chunk at most
RESUME_CACHE_LIMIT = 20_000
# how long a stopping run waits for its Dask chunks' answers (SIGTERM to exit is at most 5 s)
DRAIN_S = 2.0


class ChunkPipeline:
    """One flow run's chunks. With threads, one computes and the next is queued behind it. With
    Dask, several are in flight (one per worker), each worker with its share of `--concurrency`
    and of what is left of the budget."""

    def __init__(self, run: LabelRun, summary: LabelSummary, task: Any):
        o = run.options
        self.run, self.summary, self.task = run, summary, task
        self.dask = o.task_runner == "dask"
        # threads: the next chunk waits in the runner's one thread, so it starts computing the
        # moment the previous one ends, while this thread writes that one (and embeds its labels)
        self.in_flight_max = max(1, o.workers) if self.dask else 2
        self.global_limits = _global_limits(o)
        # each worker's share (of this run's share of the global limit, with a server)
        self.chunk_options = dataclasses.replace(o, concurrency=max(1, o.concurrency // self.in_flight_max)) \
            if self.dask else o
        self.cached = _resume_cache(run) if self.dask else None
        self.pending = iter(())
        self.progress: LabelProgress | None = None
        self.in_flight: deque = deque()  # (PreparedChunk, future), oldest first

    def label(self, ids: list[int]) -> None:
        from featurescribe.flows.runners import make_task_runner, workers_see_api
        from featurescribe.progress import Progress

        o = self.run.options
        self.pending = label_core.chunks(ids, o.chunk_size)
        with ExitStack() as stack:
            if self.dask:
                stack.enter_context(workers_see_api())
            runner = stack.enter_context(make_task_runner(
                o.task_runner, threads=1, workers=o.workers, address=o.dask_address))
            bar = stack.enter_context(Progress("label", total=len(ids), unit="features", enabled=o.progress))
            self.progress = LabelProgress(bar, self.run.budget, total=len(ids),
                                          artifact_key=self.run.run_id.lower() if ids else None)
            try:
                self._drain(runner)
            except BaseException as err:
                if self.dask:
                    self._keep_paid_answers(runner)
                for _, queued in self.in_flight:  # not started: never start
                    queued.wrapped_future.cancel()
                stop_running()  # before the task runner waits for its threads
                stopped = as_interruption(err)  # DuckDB's 'Query interrupted' is the signal
                if stopped is not err:
                    raise stopped from None
                raise
            self.progress.refresh(force=True)

    def _drain(self, runner) -> None:
        in_flight = self.in_flight
        ahead = self._prepare_next()
        while ahead is not None or in_flight:
            while ahead is not None and len(in_flight) < self.in_flight_max:
                if ahead.examples:
                    in_flight.append((ahead, self._submit(runner, ahead)))
                else:  # dead or rare features only: nothing to compute
                    self._write(ahead, ChunkResult(ahead.source_id, skipped=list(ahead.skipped)), None)
                ahead = self._prepare_next()
            if in_flight:  # it stays in flight until written: a stop on the way keeps its answers
                prepared, future = in_flight[0]
                while not future.wrapped_future.done():  # the artifact moves while it computes
                    future.wait(timeout=1.0)
                    self.progress.refresh()
                result = future.result()
                in_flight.popleft()
                self._write(prepared, *result)

    def _keep_paid_answers(self, runner) -> None:
        """Dask, on the way out (a signal, an error): the workers' chunks hold answers already paid
        for. Cancel their calls, then write what each chunk had (its ledger rows and cache entries,
        or the whole chunk when it had finished), waiting for them at most DRAIN_S."""
        from featurescribe.interrupts import stop_worker_calls

        try:  # a cluster this run started closes next: its later chunks stop at once too
            runner.client.run(stop_worker_calls, self.run.options.dask_address is None)
        except Exception:  # noqa: BLE001 - the cluster is gone: nothing to keep
            return
        deadline = time.monotonic() + DRAIN_S
        for entry in list(self.in_flight):
            try:
                result, calls = entry[1].result(timeout=max(0.05, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - not back in time, or failed: nothing to keep
                continue
            self.in_flight.remove(entry)
            # an interrupted chunk writes only its calls (its features are done by the next run)
            self.summary.add(result, self.run.write(result, calls))

    def _prepare_next(self) -> PreparedChunk | None:
        for chunk_ids in self.pending:
            if not self.run.budget.exhausted:
                return self.run.prepare(chunk_ids)
            self.summary.leave_for_later(chunk_ids)
        return None

    def _submit(self, runner, prepared: PreparedChunk):
        from prefect.utilities.annotations import quote

        budget: Any = self.run.budget
        if self.dask:  # a worker's share of what is left (a number: a Budget does not pickle)
            budget = None if budget.limit_usd is None else (budget.remaining_usd or 0.0) / self.in_flight_max
        name = f"label-chunk-{prepared.feature_ids[0]}-{prepared.feature_ids[-1]}"
        # quote: Prefect does not walk the examples looking for futures (in this process; a
        # quoted value does not survive Dask's pickling, which walks them anyway)
        q = (lambda v: v) if self.dask else quote
        return runner.submit(self.task.with_options(task_run_name=name), parameters={
            "prepared": q(prepared), "options": self.chunk_options, "run_id": self.run.run_id,
            "budget": budget, "store": q(self.run.store), "cached": self.cached,
            "global_limits": self.global_limits,
            "progress": None if self.dask else q(self.progress)})

    def _write(self, prepared: PreparedChunk, result: ChunkResult, calls) -> None:
        counts = self.run.write(result, calls)  # after this chunk's ledger rows
        self.summary.add(result, counts)
        if result.broken:
            raise BackendBroken(result.broken, "", result.broken_exit)
        if calls is not None:
            self.run.budget.add(result.spent_usd, calls=0)
        self.progress.chunk_written(prepared.feature_ids, counts.ledger_rows)


def _global_limits(options) -> dict | None:
    """Prefect global limits of the run's provider backends, with a Prefect server."""
    from featurescribe.flows import global_limits
    from featurescribe.flows.prefect_env import api_url
    from featurescribe.llm.registry import is_llm_spec

    specs = [s for s in (options.explainer, options.simulator) if is_llm_spec(s)]
    if specs and global_limits.enabled() and api_url():
        return global_limits.ensure_global_limits(specs, options.concurrency) or None
    return None


def _resume_cache(run: LabelRun) -> dict:
    from featurescribe.llm.registry import is_llm_spec
    from featurescribe.store.runs import resume_cache_entries

    o = run.options
    if not (is_llm_spec(o.explainer) or is_llm_spec(o.simulator)):
        return {}
    with run.db.connect() as con:
        return resume_cache_entries(con, o.source_id, RESUME_CACHE_LIMIT)
