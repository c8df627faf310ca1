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
when they returned with batches still running); their ledger rows carry that run's id.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import uuid
from dataclasses import dataclass, replace
from typing import Any

from featurescribe.errors import FeaturescribeError
from featurescribe.flows import label_core
from featurescribe.flows.label_core import LabelParams, LabelSummary
from featurescribe.llm.base import parse_backend_spec
from featurescribe.llm.batch import BatchOptions, BatchPending, BatchReport, BatchRunner
from featurescribe.llm.batch.collector import has_batch_api

POLL_DEFAULT_S = 30.0


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch APIs (half price, results within 24 h)")
    g.add_argument("--batch", action="store_true",
                   help="send the openai:/anthropic: requests as provider batches (OpenAI Batch, "
                        "Anthropic Message Batches) at the batch price")
    g.add_argument("--no-wait", action="store_true",
                   help="with --batch: submit and return; run the same command again later to "
                        "collect and go on")
    g.add_argument("--batch-retry", choices=["batch", "direct"], default="batch",
                   help="errored, expired or cancelled requests go in a new batch (default) or "
                        "directly through the ordinary API at the list price")
    g.add_argument("--batch-poll", type=float, default=POLL_DEFAULT_S, metavar="S",
                   help=f"first wait between polls, growing 1.5x up to 10 min (default: {POLL_DEFAULT_S:g})")


def batch_options_from_args(args: argparse.Namespace) -> BatchOptions | None:
    """The BatchOptions of `--batch` (None without it)."""
    if not getattr(args, "batch", False):
        if getattr(args, "no_wait", False):
            raise FeaturescribeError("--no-wait goes with --batch")
        return None
    return BatchOptions(wait=not args.no_wait, retry=args.batch_retry,
                        poll_initial_s=max(0.0, float(args.batch_poll)),
                        progress=not getattr(args, "no_progress", False))


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


def run_label_batch(db: str, params: LabelParams, options: BatchOptions, *,
                    progress: bool = True, stream=None, providers: dict[str, Any] | None = None,
                    sleep=None) -> BatchLabelResult:
    """The batch phases, then (when every answer is in) the ordinary label run."""
    from featurescribe.errors import first_error_line
    from featurescribe.llm.budget import Budget
    from featurescribe.store import runs as runs_sql
    from featurescribe.store.connection import open_db
    from featurescribe.store.llm_calls import CallStore

    if not (_batchable(params.explainer) or _batchable(params.simulator)):
        raise FeaturescribeError(
            "--batch needs an openai:MODEL or anthropic:MODEL explainer or simulator "
            f"(got {params.explainer} / {params.simulator})")
    if not params.use_cache:
        raise FeaturescribeError("--batch works through the response cache: drop --no-cache")
    label_core.check_backends(params)
    stream = stream or sys.stderr
    run_id = f"label-batch-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    con = open_db(db, create=False)
    try:
        ids = label_core.select_features(con, params.source_id, params.features,
                                         explainer=params.explainer, skip_done=params.skip_done)
        runs_sql.insert_run(con, run_id, "label-batch",
                            {**params.as_dict(), "batch": {"wait": options.wait, "retry": options.retry}},
                            None)
        store = CallStore(con)
        budget = Budget(params.budget_usd)
        runner = BatchRunner(con, store, run_id=run_id, options=options, budget=budget,
                             providers=providers, sleep=sleep, stream=stream)

        async def main() -> BatchReport:
            exp_client, sim_client = label_core._make_clients(params, store, budget, run_id)
            clients = {"explainer": exp_client, "simulator": sim_client}

            async def collect_pass(swapped: dict[str, Any]) -> None:
                exp, sim = swapped["explainer"], swapped["simulator"]
                if sim is not None and sim is sim_client and sim is not exp_client:
                    sim = _Deferred(sim)  # a local simulator: run it once, in the final run
                for chunk_ids in label_core.chunks(ids, params.chunk_size):
                    prepared = label_core.prepare_chunk(con, params, chunk_ids)
                    if prepared.examples:
                        await label_core.compute_chunk(prepared, params, store=store, budget=budget,
                                                       run_id=run_id, clients=(exp, sim))

            try:
                return await runner.run({k: v for k, v in clients.items() if v is not None},
                                        lambda swapped: collect_pass({**clients, **swapped}))
            finally:
                for c in {id(c): c for c in clients.values() if c is not None}.values():
                    await c.aclose()

        try:
            report = asyncio.run(main())
            store.close()
        except BaseException as err:
            try:
                store.close()
            finally:
                runs_sql.finish_run(con, run_id, "cancelled" if isinstance(err, KeyboardInterrupt)
                                    else "failed", first_error_line(err))
            if isinstance(err, KeyboardInterrupt):
                print("featurescribe: submitted batches keep running; run the same command again "
                      "to collect them", file=stream)
            raise
        spent = float(con.execute("SELECT coalesce(sum(cost_usd), 0) FROM llm_calls WHERE run_id = ?",
                                  [run_id]).fetchone()[0])
        runs_sql.finish_run(con, run_id, "completed" if report.done else "waiting",
                            None if report.done else report.summary())
    finally:
        con.close()
    print(report.summary() + f"; batch spend ${spent:.4f}", file=stream)
    if not report.done:
        print("featurescribe: batches are running; run the same command again (later) to collect "
              "them and go on", file=stream)
        return BatchLabelResult(report, None, run_id, spent)
    if params.budget_usd is not None:  # the batches spent part of the budget already
        params = replace(params, budget_usd=max(0.0, params.budget_usd - spent))
    summary = label_core.run_label(db, params, progress=progress)
    return BatchLabelResult(report, summary, run_id, spent)
