"""The label pipeline as plain functions of plain values: sample -> explain -> score -> write.

The label runs (flows/label_run.py, flows/label_flow.py) call them chunk by chunk; the Prefect
label flow wraps the compute step in a task. Features go in chunks (a few hundred):

    ids = select_features(con, source_id, "alive", explainer=spec, skip_done=True)
    for chunk_ids in chunks(ids, options.chunk_size):
        prepared = prepare_chunk(con, options, chunk_ids)              # the writer: sampling SQL
        result = await compute_chunk(prepared, options, clients, ...)  # LLM calls, no database
        counts = write_chunk(con, result, run_id=run_id)               # the writer: one transaction

- `prepare_chunk` samples the chunk's examples (kept when a feature already has them, so a
  resumed run sees the same windows), marks dead and rare features, and loads the windows.
- `compute_chunk` explains every feature (`--candidates N`: N candidates at temperature > 0,
  one per distinct text, each scored on the `valid` split by the simulation scorer, the best one
  chosen), then scores
  the chosen explanation on `test` with every scorer. All features of the chunk run at once
  under the LLM client's concurrency limit. It never touches DuckDB: LLM calls go through the
  clients it is handed, which record to their CallStore (ledger rows and the response cache).
- `write_chunk` writes the chunk's explanations, scores, simulations and (from a store with
  `flush_to`) ledger rows in one transaction.

Resume: `select_features(skip_done=True)` leaves out features that already have a chosen, scored
explanation by the same explainer; re-running the rest repeats no paid call (the cache answers).
The shuffled-explanation baseline of a feature is the chosen explanation of the next feature of
the same chunk (rotated by one).

Every value passed between the steps is a picklable dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

from featurescribe.errors import BadOption, UnknownFeature
from featurescribe.flows.label_options import LabelOptions
from featurescribe.labelers import ExplainOutcome, is_llm_explainer, make_explainer
from featurescribe.llm.base import BudgetExceeded, gather_settled
from featurescribe.records import Explanation, FeatureExamples, ScoreResult
from featurescribe.statuses import ExitStatus, ExplanationStatus, FeatureStatus
from featurescribe.store import labelling as sql
from featurescribe.store.harvest_rows import refuse_unfinished
from featurescribe.store.sampling import load_examples, sample_examples
from featurescribe.store.transaction import transaction


# ---------------------------------------------------------------------------------------------
# choosing features


def parse_feature_spec(spec: str, width: int) -> list[int] | str:
    """'all' / 'alive' as they are; '0:64' -> [0..63]; '3,17,40' -> [3, 17, 40]."""
    text = (spec or "").strip().lower()
    if text in ("all", "alive"):
        return text
    try:
        if ":" in text:
            lo_s, hi_s = text.split(":", 1)
            lo = int(lo_s) if lo_s.strip() else 0
            hi = int(hi_s) if hi_s.strip() else width
            ids = list(range(lo, hi))
            if lo < 0 or hi <= lo:  # '5:5' selects nothing
                raise ValueError
        else:
            ids = sorted({int(x) for x in text.split(",") if x.strip()})
            if not ids:
                raise ValueError
    except ValueError:
        raise BadOption(
            f"bad feature spec {spec!r}: use a range like 0:64, a list like 3,17,40, all, or alive"
        ) from None
    outside = [f for f in ids if f < 0 or f >= width]
    if outside:
        raise UnknownFeature(
            f"features {outside[0]}{'...' if len(outside) > 1 else ''} are outside the source's "
            f"{width} features (0:{width})")
    return ids


def select_features(con, source_id: str, spec: str = "all", *, explainer: str | None = None,
                    skip_done: bool = True) -> list[int]:
    """The feature ids a label run works on, in order.

    With `skip_done`, features that already have a chosen explanation by `explainer` with a
    score are left out, so a resumed run does only what is missing.
    """
    width = sql.source_width(con, source_id)
    refuse_unfinished(con, [source_id])
    parsed = parse_feature_spec(spec, width)
    if parsed == "all":
        ids = sql.all_feature_ids(con, source_id) or list(range(width))
    elif parsed == "alive":
        ids = sql.alive_feature_ids(con, source_id) or _refuse_no_alive(con, source_id)
    else:
        ids = list(parsed)
    if skip_done and explainer and ids:
        done = sql.labelled_feature_ids(con, source_id, explainer)
        ids = [f for f in ids if f not in done]
    return [int(f) for f in ids]


def _refuse_no_alive(con, source_id: str) -> list[int]:
    """BadOption: `alive` selects nothing, as a range like 5:5 (refused too), and says why."""
    dead, rare, threshold = sql.not_alive_counts(con, source_id)
    raise BadOption(
        f"--features alive selects no feature of source {source_id}: {dead:,} are dead (never above its "
        f"harvest threshold {threshold:g}) and {rare:,} rare (active in too few sequences, found by an "
        "earlier label run); harvest it again with a lower --threshold or more --max-tokens (--overwrite), "
        "or name features by id")


def chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), max(1, size)):
        yield list(ids[i:i + size])


# ---------------------------------------------------------------------------------------------
# prepare (the writer process)


@dataclass
class SkippedFeature:
    feature_id: int
    status: str  # FeatureStatus.DEAD | RARE | GATED
    reason: str


@dataclass
class PreparedChunk:
    source_id: str
    feature_ids: list[int]
    examples: list[FeatureExamples]
    skipped: list[SkippedFeature] = field(default_factory=list)
    source: dict | None = None  # the `sources` row, when the intervention scorer steers its model


def prepare_chunk(con, options: LabelOptions, feature_ids: Sequence[int]) -> PreparedChunk:
    """Sample the chunk's windows (one SQL statement, written to `examples`) and load them."""
    ids = sorted({int(f) for f in feature_ids})
    report = sample_examples(con, options.source_id, ids, options.sampling)
    skipped = []
    if report.skipped:
        reasons = sql.skip_reasons(con, options.source_id, report.skipped)
        skipped += [SkippedFeature(f, FeatureStatus.DEAD, reasons.get(f) or "no activations") for f in report.dead]
        skipped += [SkippedFeature(f, FeatureStatus.RARE, reasons.get(f) or "too few active sequences") for f in report.rare]
    loaded = load_examples(con, options.source_id, [f for f in ids if f not in set(report.skipped)])
    if options.logit_lens and loaded and is_llm_explainer(options.explainer):
        attach_promoted_tokens(con, options.source_id, loaded, options.logit_lens)
    if options.output_effects and loaded and is_llm_explainer(options.explainer):
        from featurescribe.steer.effects import attach_output_effects

        attach_output_effects(con, options.source_id, loaded, options.output_effects,
                              n_prompts=options.intervention_prompts, target_kl=options.target_kl)
    source = sql.source_row(con, options.source_id) if "intervention" in options.scorer_names and loaded else None
    return PreparedChunk(options.source_id, ids, [loaded[f] for f in sorted(loaded)],
                         sorted(skipped, key=lambda s: s.feature_id), source)


def attach_promoted_tokens(con, source_id: str, examples: dict[int, FeatureExamples], k: int) -> None:
    """Each feature's k most promoted tokens (logit lens), from `features.promoted_tokens` when
    stored with at least k, else computed with the source's model and stored."""
    from featurescribe.labelers.logit_lens import promoted_tokens

    have = sql.stored_promoted_tokens(con, source_id, sorted(examples), k)
    missing = [f for f in sorted(examples) if f not in have]
    if missing:
        new = promoted_tokens(sql.source_row(con, source_id), missing, k)
        sql.save_promoted_tokens(con, source_id, new)
        have.update(new)
    for f, fe in examples.items():
        fe.promoted = list(have[f])[:k]


# ---------------------------------------------------------------------------------------------
# compute (async; no database)


@dataclass
class ExplanationRow:
    """An explanation as `explanations` stores it: an ok one, or a failed one (text '')."""

    explanation: Explanation
    status: str = ExplanationStatus.OK
    chosen: bool = False
    error: str | None = None


@dataclass
class ChunkResult:
    source_id: str
    explanations: list[ExplanationRow] = field(default_factory=list)
    scores: list[ScoreResult] = field(default_factory=list)
    skipped: list[SkippedFeature] = field(default_factory=list)
    labelled: list[int] = field(default_factory=list)  # features with a chosen, scored explanation
    failed: dict[int, str] = field(default_factory=dict)  # feature -> why it has no label
    not_done: list[int] = field(default_factory=list)  # left for a later run (budget)
    intruder: dict[int, float] = field(default_factory=dict)  # the gate's accuracy per feature
    stopped_at_budget: bool = False
    spent_usd: float = 0.0
    broken: str | None = None  # the circuit breaker's line: a backend stopped answering
    broken_exit: int = ExitStatus.ERROR  # and the exit status it asks for (2: a refused key)
    interrupted: bool = False  # stopped on a Dask worker by a signal to the flow: only its calls count


@dataclass
class LLMClients:
    """The run's LLM clients: one for the explainer and one for the simulator (the same client
    when both name the same backend), None for a no-LLM explainer or simulator."""

    explainer: Any = None
    simulator: Any = None

    def distinct(self) -> list[Any]:
        return list({id(c): c for c in (self.explainer, self.simulator) if c is not None}.values())

    def spent_usd(self) -> float:
        return sum(getattr(c, "spent_usd", 0.0) for c in self.distinct())


def make_clients(options: LabelOptions, *, store=None, budget=None, run_id: str | None = None) -> LLMClients:
    """The LLM clients a run of `options` needs, recording to `store` within `budget`."""
    from featurescribe.llm.client import make_client
    from featurescribe.llm.registry import is_llm_spec

    def make(spec: str):
        return make_client(spec, store=store, run_id=run_id, budget=budget,
                           use_cache=options.use_cache, concurrency=options.concurrency,
                           structured=options.structured, timeout_s=options.timeout,
                           max_failures=options.max_failures)

    clients = LLMClients(make(options.explainer) if is_llm_explainer(options.explainer) else None)
    if is_llm_spec(options.simulator):
        same = clients.explainer is not None and clients.explainer.spec == options.simulator
        clients.simulator = clients.explainer if same else make(options.simulator)
    return clients


@asynccontextmanager
async def llm_clients(options: LabelOptions, *, store=None, budget=None,
                      run_id: str | None = None) -> AsyncIterator[LLMClients]:
    """`make_clients`, closed (HTTP clients, buffered ledger rows) when the block ends."""
    clients = make_clients(options, store=store, budget=budget, run_id=run_id)
    try:
        yield clients
    finally:
        for c in clients.distinct():
            await c.aclose()


def as_budget(budget):
    """A `Budget` from a Budget, a number of USD (what a Dask worker is handed) or None."""
    from featurescribe.llm.budget import Budget

    return budget if budget is None or isinstance(budget, Budget) else Budget(float(budget))


@dataclass
class _Chunk:
    """One chunk's compute step: what every stage of it reads, and the result it fills in."""

    prepared: PreparedChunk
    options: LabelOptions
    explainer: Any
    simulator: Any
    sim_client: Any
    run_id: str | None
    result: ChunkResult
    steering: Any = None  # the intervention scorer's scorers.intervention.FeatureSteering
    progress: Any = None  # flows.label_progress.LabelProgress: told as each feature is done
    by_key: dict[tuple[str, int], FeatureExamples] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key = {(fe.source_id, fe.feature_id): fe for fe in self.prepared.examples}

    def examples_of(self, e: Explanation) -> FeatureExamples:
        return self.by_key[(e.source_id, e.feature_id)]

    def feature_done(self) -> None:
        if self.progress is not None:
            self.progress.feature_done(self.prepared.feature_ids[0])


async def compute_chunk(prepared: PreparedChunk, options: LabelOptions, clients: LLMClients | None = None,
                        *, store=None, budget=None, run_id: str | None = None, progress=None) -> ChunkResult:
    """Explain and score every feature of the chunk, all at once under the clients' concurrency.

    `clients` record to their CallStore (ledger rows, response cache) and are the caller's to
    close; without them, clients recording to `store` are made for this chunk and closed.
    `budget` is the run's `llm.budget.Budget` (or a number of USD; None: no limit). `store` also
    gets the ledger rows of the intervention scorer's forward passes. `progress` (a LabelProgress)
    hears of each feature as it is done.
    """
    from featurescribe.scorers import make_simulator

    budget = as_budget(budget)
    if clients is None:
        async with llm_clients(options, store=store, budget=budget, run_id=run_id) as own:
            return await compute_chunk(prepared, options, clients=own, store=store, budget=budget,
                                       run_id=run_id, progress=progress)
    spent_before = clients.spent_usd()
    explainer = make_explainer(options.explainer, client=clients.explainer, method=options.method_name,
                               max_windows=options.explain_windows)
    simulator = make_simulator(options.simulator, client=clients.simulator,
                               windows_per_call=options.sim_windows_per_call)
    chunk = _Chunk(prepared, options, explainer, simulator,
                   clients.simulator, run_id, ChunkResult(prepared.source_id, skipped=list(prepared.skipped)),
                   steering=_steering(prepared, options, store, run_id), progress=progress)
    if options.gate_threshold is not None:
        await gate_features(chunk, clients.simulator)
    per_feature = await explain_features(chunk)
    chosen = await choose_candidates(chunk, per_feature)
    await score_chosen(chunk, chosen)
    result = chunk.result
    if budget is not None:
        result.stopped_at_budget |= budget.stopped
    # this chunk's spend (the clients may have served earlier chunks)
    result.spent_usd = clients.spent_usd() - spent_before
    result.labelled.sort()
    result.not_done.sort()
    return result


def _steering(prepared: PreparedChunk, options: LabelOptions, store, run_id):
    """The intervention scorer's FeatureSteering over the chunk's features (None when not asked)."""
    if prepared.source is None or "intervention" not in options.scorer_names:
        return None
    from featurescribe.scorers.intervention import steering_for_source

    max_acts = {fe.feature_id: fe.max_act for fe in prepared.examples}
    return steering_for_source(prepared.source, max_acts, options.intervention_config(),
                               store=store, run_id=run_id)


async def gate_features(chunk: _Chunk, client: Any) -> None:
    """--gate intruder:T: the intruder test on every feature of the chunk (judged as detection
    would be: the simulator's backend, or lexical); features below T are dropped from the chunk
    as 'gated'. A feature too sparse to build a set passes."""
    from featurescribe.scorers.intruder import IntruderFailed, gate_feature
    from featurescribe.scorers.registry import default_judge, make_judge

    judge = make_judge(default_judge(chunk.options.simulator), client=client)
    threshold = chunk.options.gate_threshold
    examples = chunk.prepared.examples

    async def one(fe: FeatureExamples):
        try:
            return await gate_feature(judge, fe)
        except IntruderFailed as err:
            chunk.result.failed[fe.feature_id] = f"intruder gate failed: {err}"
            return err
        except BudgetExceeded:
            chunk.result.not_done.append(fe.feature_id)
            chunk.result.stopped_at_budget = True
            return None

    outcomes = await gather_settled(*(one(fe) for fe in examples))
    kept = []
    for fe, out in zip(examples, outcomes):
        if fe.feature_id in chunk.result.failed or fe.feature_id in chunk.result.not_done:
            continue
        if out is not None:
            chunk.result.intruder[fe.feature_id] = out.accuracy
            if out.accuracy < threshold:
                reason = f"intruder accuracy {out.accuracy:.2f} below the gate {threshold:g} ({judge.spec})"
                chunk.result.skipped.append(SkippedFeature(fe.feature_id, FeatureStatus.GATED, reason))
                continue
        kept.append(fe)
    chunk.prepared = dataclasses.replace(chunk.prepared, examples=kept)


async def explain_features(chunk: _Chunk) -> dict[int, list[ExplanationRow]]:
    """Every feature's candidates (all features at once); a feature the budget stopped is left
    for a later run."""
    n = chunk.options.n_candidates
    outcomes = await gather_settled(*(chunk.explainer.explain(fe, n) for fe in chunk.prepared.examples))
    per_feature: dict[int, list[ExplanationRow]] = {}
    for fe, ocs in zip(chunk.prepared.examples, outcomes):
        if any(oc.stopped for oc in ocs):
            chunk.result.not_done.append(fe.feature_id)
            chunk.result.stopped_at_budget = True
            continue
        rows = distinct_texts([_explanation_row(chunk, fe, oc) for oc in ocs])
        per_feature[fe.feature_id] = rows
        chunk.result.explanations.extend(rows)
    return per_feature


def distinct_texts(rows: list[ExplanationRow]) -> list[ExplanationRow]:
    """One ok row per distinct text (candidates sampled at temperature > 0 may agree), the first
    candidate that wrote it; failed rows (text '') are kept, each with its own error."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.status == ExplanationStatus.OK:
            if row.explanation.text in seen:
                continue
            seen.add(row.explanation.text)
        kept.append(row)
    return kept


def _explanation_row(chunk: _Chunk, fe: FeatureExamples, oc: ExplainOutcome) -> ExplanationRow:
    e = Explanation(explanation_id=uuid.uuid4().hex, source_id=fe.source_id, feature_id=fe.feature_id,
                    text=oc.text if oc.ok else "", explainer=chunk.explainer.spec,
                    method=chunk.options.method_name, candidate=oc.candidate, run_id=chunk.run_id)
    status = ExplanationStatus.OK if oc.ok else ExplanationStatus.FAILED
    return ExplanationRow(e, status, False, oc.error)


async def choose_candidates(chunk: _Chunk, per_feature: dict[int, list[ExplanationRow]]) -> dict[int, ExplanationRow]:
    """Each feature's chosen explanation: the only ok one, or the best candidate on `valid`
    (simulation scorer). A feature without an ok explanation is failed."""
    chosen: dict[int, ExplanationRow] = {}
    contested: dict[int, list[ExplanationRow]] = {}
    for f, rows in per_feature.items():
        ok = [r for r in rows if r.status == ExplanationStatus.OK]
        if not ok:
            errs = sorted({r.error for r in rows if r.error})
            chunk.result.failed[f] = "explanation failed: " + ("; ".join(errs) or "no answer")
            chunk.feature_done()
        elif len(ok) == 1:
            chosen[f] = ok[0]
        else:
            contested[f] = ok
    if contested:
        chosen.update(await _best_on_valid(chunk, contested))
    for row in chosen.values():
        row.chosen = True
    return chosen


async def _best_on_valid(chunk: _Chunk, contested: dict[int, list[ExplanationRow]]) -> dict[int, ExplanationRow]:
    rows = [r for ok in contested.values() for r in ok]
    others = sampled_baselines(rotate_others(rows, by_candidate=True), rows, chunk.options.baseline_every)
    scores, _, stopped = await score_rows(chunk, rows, ("simulation",), "valid", others)
    fill_population_baselines(scores)
    chunk.result.scores.extend(scores)
    chunk.result.stopped_at_budget |= stopped
    value = {s.explanation_id: s.value for s in scores if s.scorer == "simulation"}
    best = {}
    for f, ok in contested.items():
        scored = [r for r in ok if r.explanation.explanation_id in value] or ok[:1]
        best[f] = max(scored, key=lambda r: (value.get(r.explanation.explanation_id, float("-inf")),
                                             -r.explanation.candidate))
    return best


async def score_chosen(chunk: _Chunk, chosen: dict[int, ExplanationRow]) -> None:
    """Score the chosen explanations on `test` with every scorer; the shuffled baseline rotates
    by one feature."""
    rows = [chosen[f] for f in sorted(chosen)]
    others = sampled_baselines(rotate_others(rows), rows, chunk.options.baseline_every)
    scores, errors, stopped = await score_rows(chunk, rows, chunk.options.scorer_names, "test", others,
                                               on_scored=chunk.feature_done)
    fill_population_baselines(scores)
    result = chunk.result
    result.scores.extend(scores)
    result.stopped_at_budget |= stopped
    scored_ids = {s.explanation_id for s in scores}
    for f in sorted(chosen):
        if chosen[f].explanation.explanation_id in scored_ids:
            result.labelled.append(f)
        elif stopped:
            result.not_done.append(f)
        else:
            result.failed[f] = "scoring failed: " + ("; ".join(errors) or "no score")


async def score_rows(chunk: _Chunk, rows: Sequence[ExplanationRow], scorers: Sequence[str], split: str,
                     others: dict[str, str], on_scored=None) -> tuple[list[ScoreResult], list[str], bool]:
    """Score each explanation on its own (so a budget stop keeps what finished): (scores, errors
    of the failed ones, whether the budget stopped any). `on_scored()` after each one that ends."""
    from featurescribe.scorers import score_explanations

    scores: list[ScoreResult] = []
    errors: list[str] = []
    stopped = False

    async def one(row: ExplanationRow) -> None:
        nonlocal stopped
        e = row.explanation
        try:
            outcome = await score_explanations(
                [e], {(e.source_id, e.feature_id): chunk.examples_of(e)}, simulator=chunk.simulator,
                client=chunk.sim_client, scorers=list(scorers), split=split, steering=chunk.steering,
                other_explanations={e.explanation_id: others[e.explanation_id]} if e.explanation_id in others else None)
        except BudgetExceeded:
            stopped = True
            return
        scores.extend(outcome.results)
        errors.extend(f"{f.scorer}: {f.error}" for f in outcome.failures)
        if on_scored is not None:
            on_scored()

    await gather_settled(*(one(r) for r in rows))
    return scores, errors, stopped


def baseline_sampled(source_id: str, feature_id: int, every: int) -> bool:
    """Whether a feature gets its own shuffled baseline under --baseline sample:N (every = N):
    one feature in N, by a hash of its id, the same in every run."""
    return every == 1 or (every > 1 and zlib.crc32(f"{source_id}:{feature_id}".encode()) % every == 0)


def sampled_baselines(others: dict[str, str], rows: Sequence[ExplanationRow], every: int) -> dict[str, str]:
    """The shuffled-baseline texts of the features --baseline keeps (with sample:N, at least the
    chunk's first feature, all its candidates, so its population baseline exists)."""
    keep = [r for r in rows if baseline_sampled(r.explanation.source_id, r.explanation.feature_id, every)]
    if every > 1 and not keep and rows:
        keep = [r for r in rows if r.explanation.feature_id == rows[0].explanation.feature_id]
    ids = {r.explanation.explanation_id for r in keep}
    return {k: v for k, v in others.items() if k in ids}


def fill_population_baselines(scores: Sequence[ScoreResult]) -> None:
    """A score without its own shuffled baseline gets the mean of its chunk's scores (same
    scorer) that have one, as `baseline_population`."""
    by_scorer: dict[str, list[float]] = {}
    for s in scores:
        if s.baseline_shuffled is not None and math.isfinite(s.baseline_shuffled):
            by_scorer.setdefault(s.scorer, []).append(s.baseline_shuffled)
    for s in scores:
        own = by_scorer.get(s.scorer)
        if s.baseline_shuffled is None and own:
            s.baseline_population = sum(own) / len(own)
            s.details["baseline_population"] = {"mean": s.baseline_population, "n": len(own)}


def rotate_others(rows: Sequence[ExplanationRow], by_candidate: bool = False) -> dict[str, str]:
    """Each explanation's shuffled baseline: an explanation of the next feature (rotated by one),
    the same candidate number when `by_candidate`. Empty with fewer than two features."""
    from featurescribe.scorers.scoring import rotate_by_feature

    def pick(row: ExplanationRow, nxt: list[ExplanationRow]) -> str:
        same = [o for o in nxt if o.explanation.candidate == row.explanation.candidate] if by_candidate else []
        return (same or nxt)[0].explanation.text

    partners = rotate_by_feature(rows, lambda r: r.explanation.feature_id, pick)
    return {r.explanation.explanation_id: partners[id(r)] for r in rows if id(r) in partners}


# ---------------------------------------------------------------------------------------------
# write (the writer process, one transaction)


@dataclass
class ChunkCounts:
    explanations: int = 0
    scores: int = 0
    ledger_rows: int = 0


def write_chunk(con, result: ChunkResult, *, run_id: str | None = None, calls=None, embed: bool = True) -> ChunkCounts:
    """Write a computed chunk in one transaction: explanations, scores and simulations, and the
    ledger rows and cache entries of `calls` when it is a store with `flush_to(con)` (an
    in-memory CallStore; a DuckDB-backed one writes its rows itself). `embed`: embed the new
    labels on `con` too (a run that opens the database per write embeds them itself, closed).

    A feature that gets a new chosen explanation has the older explanations by the same
    explainer and method marked not chosen.
    """
    from featurescribe.store.results import save_scores

    counts = ChunkCounts()
    with transaction(con):
        sql.unchoose_older(con, result.source_id, [r.explanation for r in result.explanations if r.chosen])
        counts.explanations = sql.insert_explanations(con, result.explanations, run_id)
        sql.save_intruder_gate(con, result.source_id, result.intruder,
                               {k.feature_id: k.reason for k in result.skipped if k.status == FeatureStatus.GATED})
        counts.scores = save_scores(con, result.scores, run_id=run_id)
        if calls is not None and hasattr(calls, "flush_to"):
            counts.ledger_rows = int(calls.flush_to(con) or 0)
    if embed and result.explanations:  # labels land with their embeddings (semantic search, browse)
        from featurescribe.semantic.embed import embed_new_labels

        embed_new_labels(con, result.source_id)
    return counts
