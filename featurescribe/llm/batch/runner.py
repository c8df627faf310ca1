"""Run a pipeline's LLM requests through provider batch APIs at the batch price.

The design: the pipeline itself is never changed. `BatchRunner.run(clients, collect_pass)` runs
it in *collect passes*: each pass calls `collect_pass(collectors)`, which runs the pipeline's
compute steps (no writes) with every openai/anthropic client replaced by a `BatchCollector`.
Answers already in the response cache come back as usual; every other request is recorded and
raises `BatchPending`. After the pass the recorded requests go out as provider batches (chunked
under each provider's limits, recorded in `llm_batches` the moment they exist), the runner polls
them with backoff and a progress line, and writes every answer into the response cache under its
cache key (the batch's `custom_id`) and into the ledger at the batch price. The next pass gets
further (explanations are answered, so the simulation requests appear), until a pass finds every
answer in the cache: then the caller runs the pipeline normally, which makes no paid call.

Errored, expired, cancelled and missing requests are recorded in the ledger ('error') and asked
again: in a new batch (retry='batch', up to `max_attempts` batches, then directly) or directly
through the ordinary client (retry='direct'). Whatever an expired batch finished is kept.

`wait=False` submits and returns (`label --batch --no-wait`); a later run first collects the
batches that ended, then submits the next phase, so a nightly schedule advances one phase a
night. A run that stops while waiting leaves its batches open; the next run picks them up
instead of submitting the requests again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from featurescribe.errors import FeaturescribeError
from featurescribe.interrupts import signals_deferred
from featurescribe.llm.base import BudgetExceeded, LLMError, parse_backend_spec
from featurescribe.llm.batch.base import (SUCCEEDED, BatchItem, BatchProvider, BatchState,
                                          provider_class)
from featurescribe.llm.batch.collector import BatchCollector, BatchSink, has_batch_api
from featurescribe.llm.breaker import BackendBroken, QuotaExhausted
from featurescribe.llm.client import classify
from featurescribe.llm.prices import DEFAULT_PRICES, ENV_VAR, PriceTable
from featurescribe.progress import Progress
from featurescribe.store import batches as sql
from featurescribe.store.connection import session
from featurescribe.store.llm_calls import CallRow, CallStore

RETRY_MODES = ("batch", "direct")
OUTAGE_KINDS = ("transport", "server", "rate_limit")  # llm.client.classify's kinds
MAX_POLL_FAILURES = 5
DEFAULT_BATCH_DISCOUNT = 0.5


def batch_discount(override: str | os.PathLike | None = None) -> float:
    """The batch price as a fraction of the list price: `batch_discount` at the top of the price
    table (prices.json, then $FEATURESCRIBE_PRICES), 0.5 when neither says."""
    value = DEFAULT_BATCH_DISCOUNT
    for path in (DEFAULT_PRICES, override or os.environ.get(ENV_VAR)):
        if not path:
            continue
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except (OSError, ValueError):
            continue  # PriceTable.load reports unreadable files
        if isinstance(data, dict) and "batch_discount" in data:
            value = float(data["batch_discount"])
    return value


def provider_limits(backend: str) -> tuple[int, int]:
    cls = provider_class(backend)
    return cls.max_requests, cls.max_bytes


@dataclass
class BatchOptions:
    wait: bool = True  # False: submit and return (--no-wait)
    retry: str = "batch"  # how failed requests are asked again: 'batch' | 'direct'
    max_attempts: int = 3  # batches a request may be in before it is asked directly
    poll_initial_s: float = 30.0  # first wait between polls; it grows by poll_factor
    poll_factor: float = 1.5
    poll_max_s: float = 600.0
    max_phases: int = 8  # collect passes before giving up (explain, simulate, ... need 2-3)
    max_requests: int | None = None  # per batch, when lower than the provider's limit
    max_bytes: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.retry not in RETRY_MODES:
            raise FeaturescribeError(f"--batch-retry must be one of {', '.join(RETRY_MODES)}")


@dataclass
class BatchReport:
    done: bool = False  # every request is answered (or failed for good): run the pipeline now
    phases: int = 0
    submitted: list[str] = field(default_factory=list)  # batch ids this run created
    n_submitted: int = 0  # requests in them
    n_collected_batches: int = 0
    n_answered: int = 0  # answers written into the cache
    n_failed_items: int = 0  # errored / expired / cancelled / missing results
    n_direct: int = 0  # requests asked through the ordinary client
    n_given_up: int = 0
    open_batches: int = 0  # still running when the run returned
    budget_stopped: bool = False

    def summary(self) -> str:
        parts = [f"{len(self.submitted)} batch(es) submitted ({self.n_submitted:,} requests)",
                 f"{self.n_collected_batches} collected ({self.n_answered:,} answers, "
                 f"{self.n_failed_items:,} failed)"]
        if self.n_direct:
            parts.append(f"{self.n_direct:,} asked directly")
        if self.n_given_up:
            parts.append(f"{self.n_given_up:,} given up")
        if self.open_batches:
            parts.append(f"{self.open_batches} still running")
        return "batch: " + ", ".join(parts)


class BatchRunner:
    """See the module docstring. `providers` ({'openai': ..., 'anthropic': ...}) replaces the
    SDK-backed adapters (tests); `sleep` replaces asyncio.sleep."""

    def __init__(self, con, store: CallStore, *, run_id: str | None = None,
                 options: BatchOptions | None = None, budget=None, prices: PriceTable | None = None,
                 providers: dict[str, BatchProvider] | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None, stream=None):
        self.con = con  # an open connection, or a Database opened for each read and write
        self.store = store
        self.run_id = run_id
        self.options = options or BatchOptions()
        self.budget = budget
        self.prices = prices or PriceTable.load()
        self.discount = batch_discount()
        self._providers = dict(providers or {})
        self._sleep = sleep or asyncio.sleep
        self.stream = stream or sys.stderr
        self.report = BatchReport()
        self.backends: set[str] | None = None  # set by run(): the providers of its clients
        self._poll_failures: dict[str, int] = {}
        self._reserved: dict[str, float] = {}  # batch id -> worst-case cost, until it is collected

    # ------------------------------------------------------------------ helpers
    def log(self, text: str) -> None:
        if self.options.progress:
            print(text, file=self.stream, flush=True)

    def provider(self, name: str) -> BatchProvider:
        if name not in self._providers:
            self._providers[name] = provider_class(name)()
        return self._providers[name]

    def limits(self, backend: str) -> tuple[int, int]:
        n, b = provider_limits(backend)
        if self.options.max_requests:
            n = min(n, self.options.max_requests)
        if self.options.max_bytes:
            b = min(b, self.options.max_bytes)
        return n, b

    # ------------------------------------------------------------------ submitting
    def _within_budget(self, collector: BatchCollector, items: list[BatchItem]) -> tuple[list[BatchItem], float]:
        """The leading items whose worst-case cost at the batch price fits in what is left of the
        budget, less the worst case of this run's batches not collected yet (what a batch costs
        is known only when it ends); and their worst-case cost."""
        price = self.prices.lookup(collector.backend, collector.model)
        left = None if self.budget is None else self.budget.remaining_usd
        if left is None or price is None:
            return items, 0.0
        left -= sum(self._reserved.values())
        n, total = 0, 0.0
        for item in items:
            cost = price.cost(*item.estimate) * self.discount
            if total + cost > left:
                break
            n, total = n + 1, total + cost
        if n < len(items):
            self.report.budget_stopped = True
            self.log(f"batch: not submitting {len(items) - n:,} of {len(items):,} requests: their "
                     f"worst-case cost passes what is left of the budget (${max(left, 0.0):.4f})")
        return items[:n], total

    def submit(self, collector: BatchCollector, items: list[BatchItem]) -> int:
        """Create one provider batch of `items` (those the budget allows) and record it at once;
        how many were submitted."""
        if self.report.budget_stopped:
            return 0
        if self.budget is not None:
            try:
                self.budget.check()
            except BudgetExceeded as err:
                self.report.budget_stopped = True
                self.log(f"batch: not submitting {len(items):,} requests: {err}")
                return 0
        items, worst = self._within_budget(collector, items)
        if not items:
            return 0
        provider = self.provider(collector.backend)
        purposes = sorted({i.purpose for i in items})
        metadata = {"featurescribe_spec": collector.spec}
        if self.run_id:
            metadata["featurescribe_run"] = self.run_id
        # a signal between the provider creating the (paid) batch and its row here would lose its
        # id, and the next run would pay for the same requests again: it waits for the row
        with signals_deferred():
            try:
                batch_id, file_id = provider.submit(items, metadata)
            except Exception as err:
                raise _endpoint_failed(
                    f"{collector.spec}: could not submit a batch of {len(items):,} requests: "
                    f"{_one_line(err)}", err) from None
            with session(self.con) as con:
                sql.insert_batch(con, batch_id=batch_id, provider=collector.backend, run_id=self.run_id,
                                 purpose=",".join(purposes), input_file_id=file_id,
                                 payload={"spec": collector.spec, "model": collector.model},
                                 items=[(i.custom_id, i.purpose, i.structured, i.wrapped) for i in items])
        self._reserved[batch_id] = worst
        self.report.submitted.append(batch_id)
        self.report.n_submitted += len(items)
        self.log(f"batch: submitted {collector.backend} batch {batch_id} "
                 f"({len(items):,} {'/'.join(purposes)} requests to {collector.model})")
        return len(items)

    # ------------------------------------------------------------------ polling and collecting
    def _open(self) -> list[dict]:
        """The open batches of the providers this run uses (all of them before `run`)."""
        with session(self.con) as con:
            rows = sql.open_batches(con)
        return [r for r in rows if self.backends is None or r["provider"] in self.backends]

    def poll_open(self) -> list[tuple[dict, BatchState | None]]:
        """Poll every open batch once; collect those that ended. The ones still running (with
        None for a batch whose poll failed: it is tried again at the next round, and after
        `MAX_POLL_FAILURES` failures in a row the run stops with the error)."""
        running = []
        for row in self._open():
            bid = row["batch_id"]
            try:
                state = self.provider(row["provider"]).poll(bid)
                self._poll_failures.pop(bid, None)
            except Exception as err:
                n = self._poll_failures[bid] = self._poll_failures.get(bid, 0) + 1
                if n >= MAX_POLL_FAILURES:
                    raise _endpoint_failed(
                        f"cannot poll {row['provider']} batch {bid} ({n} tries): {_one_line(err)}; "
                        "it stays recorded, run again later to collect it", err) from None
                self.log(f"batch: could not poll {bid}: {_one_line(err)}")
                running.append((row, None))
                continue
            if state.ended:
                try:
                    self.collect(row, state)
                except FeaturescribeError:
                    raise
                except Exception as err:  # not marked collected: the next run reads it again
                    raise _endpoint_failed(
                        f"could not read the results of {row['provider']} batch {bid}: "
                        f"{_one_line(err)}; run again to collect it", err) from None
            else:
                if row["status"] != "in_progress" or row["payload"].get("counts") != state.counts:
                    with session(self.con) as con:
                        sql.update_batch(con, row["batch_id"], status="in_progress",
                                         payload_update={"provider_status": state.provider_status,
                                                         "counts": state.counts})
                running.append((row, state))
        return running

    def collect(self, row: dict, state: BatchState) -> None:
        """Write an ended batch's answers to the cache and every result to the ledger."""
        batch_id = row["batch_id"]
        backend, model = parse_backend_spec(row["payload"].get("spec") or f"{row['provider']}:")
        with session(self.con) as con:
            info = sql.item_info(con, batch_id)
        outcomes: list[tuple[str, str, str | None]] = []
        seen: set[str] = set()
        ignored = 0  # lines that are not JSON, no result, or for no request of this batch
        for r in self.provider(backend).results(batch_id, state):
            if r.custom_id in info and r.custom_id not in seen:
                seen.add(r.custom_id)
                outcomes.append(self._collect_one(r, batch_id, backend, model, info))
            elif r.custom_id not in seen:
                ignored += 1
        missing = [cid for cid in info if cid not in seen]
        for cid in missing:
            self._ledger(info, cid, backend, model, batch_id, "error",
                         error=f"missing from the results of batch {batch_id}")
        self.store.flush()  # answers in the cache before the batch counts as collected
        self._reserved.pop(batch_id, None)
        with session(self.con) as con:
            sql.finish_batch(con, batch_id, outcomes, payload_update={
                "provider_status": state.provider_status, "counts": state.counts,
                **{k: v for k, v in state.extra.items() if v}})
        answered = sum(o[1] == "succeeded" for o in outcomes)
        failed = len(outcomes) - answered + len(missing)
        self.report.n_collected_batches += 1
        self.report.n_answered += answered
        self.report.n_failed_items += failed
        extra = f", errors: {state.extra['errors']}" if state.extra.get("errors") else ""
        if ignored:
            extra += f", {ignored:,} result line(s) unreadable or for no request of the batch"
        self.log(f"batch: collected {batch_id} ({state.provider_status}): {answered:,} answered, "
                 f"{failed:,} to ask again{extra}")

    def _ledger(self, info: dict, cid: str, backend: str, model: str, batch_id: str, status: str, **kw) -> None:
        purpose, _, _, attempt = info[cid]
        self.store.record(CallRow(backend=backend, model=model, prompt_hash=cid, status=status,
                                  purpose=purpose, run_id=self.run_id, attempt=attempt,
                                  batch_id=batch_id, **kw))

    def _collect_one(self, r, batch_id: str, backend: str, model: str, info: dict) -> tuple[str, str, str | None]:
        """One result: its ledger row, its answer into the cache; (custom_id, outcome, error)."""
        purpose, structured, wrapped, _ = info[r.custom_id]
        if r.kind != SUCCEEDED:
            self._ledger(info, r.custom_id, backend, model, batch_id, "error",
                         error=f"{r.kind} in batch {batch_id}: {r.error or r.kind}"[:2000])
            return r.custom_id, r.kind, r.error
        try:
            resp = provider_class(backend).chat_response(
                r.body or {}, BatchItem(r.custom_id, {}, purpose or "chat", structured, wrapped))
        except Exception as err:  # an answer of an unexpected shape
            self._ledger(info, r.custom_id, backend, model, batch_id, "error",
                         error=f"unreadable answer in batch {batch_id}: {_one_line(err)}"[:2000])
            return r.custom_id, "errored", _one_line(err)
        list_cost, note = self.prices.cost(backend, model, resp.input_tokens, resp.output_tokens,
                                           resp.cached_input_tokens, resp.cache_write_tokens)
        cost = list_cost * self.discount
        if self.budget is not None:
            self.budget.add(cost)
        usage = dict(input_tokens=resp.input_tokens, output_tokens=resp.output_tokens, cost_usd=cost,
                     cached_input_tokens=resp.cached_input_tokens, cache_write_tokens=resp.cache_write_tokens)
        problem = _unusable(resp, structured)
        if problem:
            self._ledger(info, r.custom_id, backend, model, batch_id, "parse_error",
                         error=f"{problem} (batch {batch_id})", **usage)
            return r.custom_id, "errored", problem
        self.store.put_cached(r.custom_id, backend, model, resp.to_dict())
        self._ledger(info, r.custom_id, backend, model, batch_id, "ok", error=note, **usage)
        return r.custom_id, "succeeded", None

    async def wait_open(self) -> None:
        """Poll the open batches, backing off, until every one has ended and been collected."""
        opts = self.options
        delay = opts.poll_initial_s
        rows = self._open()
        if not rows:
            return
        total = sum(int(r["n_requests"] or 0) for r in rows)
        self.log(f"batch: waiting for {len(rows)} batch(es) ({total:,} requests); stop any time "
                 f"and run again to pick them up")
        with Progress("batch requests done", total=total, unit="req", enabled=opts.progress,
                      stream=self.stream) as bar:
            collected_n = 0
            while True:
                before = {r["batch_id"]: int(r["n_requests"] or 0) for r in self._open()}
                running = self.poll_open()
                still = {row["batch_id"] for row, _ in running}
                collected_n += sum(n for bid, n in before.items() if bid not in still)
                done = collected_n + sum(s.done for _, s in running if s is not None)
                if done > bar.done:
                    bar.advance(done - bar.done)
                if not running:
                    return
                await self._sleep(delay)
                delay = min(delay * opts.poll_factor, opts.poll_max_s)

    # ------------------------------------------------------------------ direct retries
    async def _direct(self, items, given_up: set[str]) -> None:
        async def one(collector: BatchCollector, key: str, request) -> None:
            try:
                await collector.inner.chat(request)
            except LLMError as err:
                given_up.add(key)
                self.report.n_given_up += 1
                self.log(f"batch: gave up on a {request.purpose} request: {_one_line(err)}")

        self.report.n_direct += len(items)
        self.log(f"batch: asking {len(items):,} request(s) directly (full price)")
        await asyncio.gather(*(one(*x) for x in items))
        self.store.flush()

    # ------------------------------------------------------------------ the phases
    async def run(self, clients: dict[str, Any],
                  collect_pass: Callable[[dict[str, Any]], Awaitable[Any]]) -> BatchReport:
        """Collect, submit, wait, repeat (see the module docstring).

        `clients`: {name: Client}; the openai/anthropic ones are replaced by collectors in each
        pass, others (local models) are passed as they are. `collect_pass(clients)` runs the
        pipeline's compute with the clients it is given and writes nothing.
        """
        opts, report = self.options, self.report
        self.backends = {c.backend for c in clients.values()
                         if has_batch_api(getattr(c, "backend", None))}
        given_up: set[str] = set()
        for phase in range(1, opts.max_phases + 1):
            report.phases = phase
            self.poll_open()  # what ended since the last run or phase goes into the cache first
            sink = BatchSink(self.con, self.submit, retry=opts.retry, max_attempts=opts.max_attempts,
                             given_up=given_up, limits=self.limits)
            swapped = {name: (BatchCollector(c, sink) if has_batch_api(getattr(c, "backend", None))
                              else c) for name, c in clients.items()}
            await collect_pass(swapped)
            sink.finish()
            self.log(f"batch: pass {phase}: {sink.n_requests:,} request(s) not in the cache: "
                     f"{sink.n_submitted:,} submitted, {sink.n_waiting:,} in running batches, "
                     f"{len(sink.direct):,} to ask directly, {sink.n_given_up:,} given up")
            if sink.direct:
                await self._direct(sink.direct, given_up)
            if sink.n_submitted == 0 and sink.n_waiting == 0:
                if sink.direct:
                    continue  # their answers may lead to further requests
                report.done = True
                return report
            if not opts.wait:
                report.open_batches = len(self._open())
                return report
            await self.wait_open()
        raise FeaturescribeError(
            f"label --batch: requests were still missing after {opts.max_phases} batch phases; "
            "run it again to go on")


def _unusable(resp, structured: bool) -> str | None:
    if resp.truncated:
        return f"answer cut at max_tokens (finish_reason {resp.finish_reason})"
    if structured:
        try:
            json.loads(resp.text)
        except (TypeError, ValueError):
            return "answer is not valid JSON"
    return None


def _endpoint_failed(message: str, err: BaseException) -> FeaturescribeError:
    """The error that stops a run when a batch endpoint failed: an outage (connection, timeout,
    5xx, 429 after the SDK's retries) ends with exit status 1, as the circuit breaker's, and so
    does an exhausted quota (as in a run without --batch); what the user can fix (a refused key,
    no such model) with 2."""
    failure = classify(err)
    if failure is not None and failure.kind == "quota":
        return QuotaExhausted(f"{message} (the account's quota or billing is exhausted; add credit or "
                              "raise the account's spend limit, then run the same command again)")
    if failure is not None and failure.kind in OUTAGE_KINDS:
        return BackendBroken(message, failure.kind)
    return FeaturescribeError(message)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__

