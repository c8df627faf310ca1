"""`featurescribe label --batch`: the label pipeline through provider batch APIs, at half price.

    featurescribe label --batch [--no-wait] [--batch-retry batch|direct] [--batch-poll S] ...

The batch phases (`featurescribe.llm.batch.BatchRunner`) run the pipeline's prepare and compute
steps with the openai/anthropic clients replaced by collectors, submit what they ask as provider
batches, wait for them and put the answers into the response cache; they repeat until every
answer is there (explanations first, then the simulations that need them, then their shuffled
baselines). Then the ordinary `label` run does the rest, every answer coming from the cache.

`--no-wait` submits the next phase's batches and returns; a later `label --batch` (with or
without `--no-wait`) collects what ended and goes on, so a nightly schedule moves one phase a
night and writes the labels on the night the last batch came back.

The batch phases are recorded in `runs` as flow 'label-batch' (status 'completed', or 'waiting'
when they returned with batches still running; 'partial' or 'failed', with the counts, when the
final run that wrote the labels ended so); their ledger rows carry that run's id.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from featurescribe.errors import FeaturescribeError
from featurescribe.flows import label_core
from featurescribe.flows.call_outcomes import record_call_outcomes
from featurescribe.flows.label_options import LabelOptions
from featurescribe.flows.label_run import LabelRun, LabelSummary, check_backends, open_label_run, run_database, \
    run_label, selected_features
from featurescribe.llm.base import parse_backend_spec
from featurescribe.llm.batch import BatchOptions, BatchPending, BatchReport, BatchRunner
from featurescribe.llm.batch.collector import has_batch_api
from featurescribe.statuses import RunStatus


def batch_options(options: LabelOptions) -> BatchOptions:
    return BatchOptions(wait=not options.no_wait, retry=options.batch_retry,
                        poll_initial_s=max(0.0, float(options.batch_poll)), progress=options.progress)


class _Deferred:
    """A non-batch client (local model) that is not run during the collect passes: nothing sent
    to a batch depends on a simulator's answer, so local simulation waits for the final run."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def chat(self, request, parse=None):
        raise BatchPending(f"{self._inner.spec}: deferred to the final run")

    async def candidate_probs(self, *args, **kwargs):
        raise BatchPending(f"{self._inner.spec}: deferred to the final run")


@dataclass
class BatchLabelResult:
    report: BatchReport
    summary: LabelSummary | None  # the final label run, when the batches were all done
    run_id: str
    spent_usd: float


def _batchable(spec: str) -> bool:
    return has_batch_api(parse_backend_spec(spec)[0])


def _check(options: LabelOptions) -> None:
    if not (_batchable(options.explainer) or _batchable(options.simulator)):
        raise FeaturescribeError(
            "--batch needs an openai:MODEL or anthropic:MODEL explainer or simulator "
            f"(got {options.explainer} / {options.simulator})")
    if not options.use_cache:
        raise FeaturescribeError("--batch works through the response cache: drop --no-cache")
    check_backends(options)


def run_label_batch(db: str, options: LabelOptions, *, stream=None, providers: dict[str, Any] | None = None,
                    sleep=None) -> BatchLabelResult:
    """The batch phases, then (when every answer is in) the ordinary label run."""
    _check(options)
    stream = stream or sys.stderr
    report, run_id, spent = _batch_phases(db, options, stream=stream, providers=providers, sleep=sleep)
    record_call_outcomes(db, run_id)  # the batch phases' attempts, --no-wait or not
    print(report.summary() + f"; batch spend ${spent:.4f}", file=stream)
    if not report.done:
        print("featurescribe: batches are running; run the same command again (later) to collect "
              "them and go on", file=stream)
        return BatchLabelResult(report, None, run_id, spent)
    if options.budget_usd is not None:  # the batches spent part of the budget already; what
        # they left unasked for the budget's sake is not asked at the list price either
        left = 0.0 if report.budget_stopped else max(0.0, options.budget_usd - spent)
        options = options.replace(budget_usd=left)
    summary = run_label(db, options, progress=options.progress)
    summary.spent_usd += spent  # the run's total: the batches' answers (ledgered under the batch run) too
    record_call_outcomes(db, summary.run_id)
    _record_outcome(db, run_id, summary)
    return BatchLabelResult(report, summary, run_id, spent)


def _record_outcome(db: str, batch_run_id: str, summary: LabelSummary) -> None:
    """The batch phases' `runs` row ends as the labels did: 'partial' when some features failed,
    'failed' when none could be labelled, with the final run's counts (the exit status is the
    final run's too)."""
    from featurescribe.store.runs import finish_run

    if summary.run_status in (RunStatus.PARTIAL, RunStatus.FAILED):
        with run_database(db).connect() as con:
            finish_run(con, batch_run_id, summary.run_status, summary.status_note())


def _batch_phases(db: str, options: LabelOptions, *, stream, providers, sleep) -> tuple[BatchReport, str, float]:
    """The collect passes and their batches, recorded as a 'label-batch' run:
    (report, run id, what the batches cost)."""
    from featurescribe.flows.run_record import recorded_run
    from featurescribe.store.runs import run_spend

    database = run_database(db)  # opened per piece of work: readers get in while batches wait
    ids, _ = selected_features(database, options)
    record = {**options.as_dict(), "batch": {"wait": not options.no_wait, "retry": options.batch_retry}}
    with recorded_run(database, "label-batch", record) as rec:
        try:
            with open_label_run(database, options, rec.run_id) as run:
                runner = BatchRunner(database, run.store, run_id=run.run_id, options=batch_options(options),
                                     budget=run.budget, providers=providers, sleep=sleep, stream=stream)
                report = asyncio.run(_collect(run, runner, ids))
        except KeyboardInterrupt:
            print("featurescribe: submitted batches keep running; run the same command again "
                  "to collect them", file=stream)
            raise
        if not report.done:
            rec.status, rec.note = RunStatus.WAITING, report.summary()
    with database.connect() as con:
        return report, rec.run_id, run_spend(con, rec.run_id)


async def _collect(run: LabelRun, runner: BatchRunner, ids: list[int]) -> BatchReport:
    """Collect passes of the pipeline, the batchable clients swapped for collectors."""
    async with run.clients() as clients:
        own = {"explainer": clients.explainer, "simulator": clients.simulator}

        async def collect_pass(swapped: dict[str, Any]) -> None:
            exp, sim = swapped.get("explainer", clients.explainer), swapped.get("simulator", clients.simulator)
            if sim is not None and sim is clients.simulator and sim is not clients.explainer:
                sim = _Deferred(sim)  # a local simulator: run it once, in the final run
            for chunk_ids in label_core.chunks(ids, run.options.chunk_size):
                prepared = run.prepare(chunk_ids)
                if prepared.examples:
                    await label_core.compute_chunk(prepared, run.options, clients=label_core.LLMClients(exp, sim),
                                                   budget=run.budget, run_id=run.run_id)

        return await runner.run({k: v for k, v in own.items() if v is not None}, collect_pass)
