"""The label pipeline as plain functions of plain values: sample -> explain -> score -> write.

The `label` command runs them in a loop; the Prefect label flow wraps each in a task. Features go
in chunks (a few hundred):

    ids = select_features(con, source_id, "alive", explainer=spec, skip_done=True)
    for chunk_ids in chunks(ids, params.chunk_size):
        prepared = prepare_chunk(con, params, chunk_ids)              # the writer: sampling SQL
        result = await compute_chunk(prepared, params, store=store)   # LLM calls, no database
        counts = write_chunk(con, result, run_id=run_id, calls=store) # the writer: one transaction

- `prepare_chunk` samples the chunk's examples (kept when a feature already has them, so a
  resumed run sees the same windows), marks dead and rare features, and loads the windows.
- `compute_chunk` explains every feature (`--candidates N`: N candidates at temperature > 0,
  each scored on the `valid` split by the simulation scorer, the best one chosen), then scores
  the chosen explanation on `test` with every scorer. All features of the chunk run at once
  under the LLM client's concurrency limit. It never touches DuckDB: LLM calls go through the
  CallStore it is handed (ledger rows and the response cache).
- `write_chunk` writes the chunk's explanations, scores, simulations and (from a store with
  `flush_to`) ledger rows in one transaction.

Resume: `select_features(skip_done=True)` leaves out features that already have a chosen, scored
explanation by the same explainer; re-running the rest repeats no paid call (the cache answers).
The shuffled-explanation baseline of a feature is the chosen explanation of the next feature of
the same chunk (rotated by one).

Every value passed between the steps is a picklable dataclass.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa

from featurescribe.errors import FeaturescribeError
from featurescribe.labelers import (
    METHODS,
    ExplainOutcome,
    check_explainer_spec,
    is_llm_explainer,
    make_explainer,
    resolve_method,
)
from featurescribe.labelers.base import first_error_line
from featurescribe.llm.base import BudgetExceeded, parse_backend_spec
from featurescribe.records import Explanation, FeatureExamples, ScoreResult
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.sampling import SamplingConfig, load_examples, sample_examples

DEFAULT_CHUNK_SIZE = 256
CANDIDATE_TEMPERATURE = 0.7


# ---------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class LabelParams:
    """Everything a label run is asked to do (the CLI options)."""

    source_id: str
    features: str = "all"  # 'all', 'alive', '0:64', '3,17,40'
    explainer: str = "baseline:tokens"
    simulator: str = "lexical"
    scorers: tuple[str, ...] = ("simulation",)
    candidates: int = 1
    concurrency: int = 16
    budget_usd: float | None = None
    use_cache: bool = True
    method: str = "auto"  # 'pairs' | 'highlighted' | 'marked' (LLM explainers); auto: marked for local models, else pairs
    chunk_size: int = DEFAULT_CHUNK_SIZE
    skip_done: bool = True
    explain_windows: int | None = None  # at most this many explain windows in a prompt
    logit_lens: int = 0  # > 0: show explainers this many tokens the feature's output promotes
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        try:
            check_explainer_spec(self.explainer)
        except ValueError as err:
            raise FeaturescribeError(str(err)) from None
        kind, model = parse_backend_spec(self.simulator)
        if kind not in ("openai", "anthropic", "local", "lexical", "baseline"):
            raise FeaturescribeError(
                f"unknown simulator {self.simulator!r}: use lexical, baseline:tokens, openai:MODEL, "
                "anthropic:MODEL or local:MODEL")
        if kind in ("openai", "anthropic", "local") and not model:
            raise FeaturescribeError(f"simulator {self.simulator!r} names no model (e.g. {kind}:MODEL)")
        from featurescribe.scorers.scoring import SCORERS

        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise FeaturescribeError(
                f"unknown scorer(s) {', '.join(bad) or '(none)'}: use {', '.join(SCORERS)}")
        if self.candidates < 1:
            raise FeaturescribeError("--candidates must be at least 1")
        if self.concurrency < 1:
            raise FeaturescribeError("--concurrency must be at least 1")
        if self.logit_lens < 0:
            raise FeaturescribeError("--logit-lens must be 0 or more tokens")
        if self.chunk_size < 1:
            raise FeaturescribeError("--chunk-size must be at least 1")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise FeaturescribeError("--budget-usd must be 0 or more")
        if self.method not in ("auto", *METHODS):
            raise FeaturescribeError(f"unknown --method {self.method!r}: use auto, {', '.join(METHODS)}")

    @property
    def method_name(self) -> str:
        """What `explanations.method` records: the prompt style, or 'tokens' for the baseline."""
        return resolve_method(self.explainer, self.method) if is_llm_explainer(self.explainer) else "tokens"

    @property
    def n_candidates(self) -> int:
        return self.candidates if is_llm_explainer(self.explainer) else 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scorers"] = list(self.scorers)
        d["sampling"] = self.sampling.as_dict()
        return d


# ---------------------------------------------------------------------------------------------
# choosing features


def _source_width(con, source_id: str) -> int:
    row = con.execute("SELECT width FROM sources WHERE source_id = ?", [source_id]).fetchone()
    if row is None:
        known = [r[0] for r in con.execute("SELECT source_id FROM sources ORDER BY 1").fetchall()]
        hint = f" (sources in this database: {', '.join(known)})" if known else \
            " (the database has no sources: run featurescribe harvest first)"
        raise FeaturescribeError(f"no source {source_id!r}{hint}")
    return int(row[0])


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
            if lo < 0 or hi < lo:
                raise ValueError
        else:
            ids = sorted({int(x) for x in text.split(",") if x.strip()})
            if not ids:
                raise ValueError
    except ValueError:
        raise FeaturescribeError(
            f"bad feature spec {spec!r}: use a range like 0:64, a list like 3,17,40, all, or alive"
        ) from None
    outside = [f for f in ids if f < 0 or f >= width]
    if outside:
        raise FeaturescribeError(
            f"features {outside[0]}{'...' if len(outside) > 1 else ''} are outside the source's "
            f"{width} features (0:{width})")
    return ids


def select_features(con, source_id: str, spec: str = "all", *, explainer: str | None = None,
                    skip_done: bool = True) -> list[int]:
    """The feature ids a label run works on, in order.

    With `skip_done`, features that already have a chosen explanation by `explainer` with a
    score are left out, so a resumed run does only what is missing.
    """
    width = _source_width(con, source_id)
    parsed = parse_feature_spec(spec, width)
    if parsed == "all":
        ids = [r[0] for r in con.execute(
            "SELECT feature_id FROM features WHERE source_id = ? ORDER BY feature_id", [source_id]
        ).fetchall()] or list(range(width))
    elif parsed == "alive":
        ids = [r[0] for r in con.execute(
            "SELECT feature_id FROM features WHERE source_id = ? AND n_active > 0 "
            "AND coalesce(status, 'alive') NOT IN ('dead', 'rare') ORDER BY feature_id", [source_id]
        ).fetchall()]
    else:
        ids = list(parsed)
    if skip_done and explainer and ids:
        done = {r[0] for r in con.execute(
            """SELECT DISTINCT e.feature_id FROM explanations e
               WHERE e.source_id = $source AND e.explainer = $explainer AND e.chosen
                 AND coalesce(e.status, 'ok') = 'ok'
                 AND EXISTS (SELECT 1 FROM scores s WHERE s.explanation_id = e.explanation_id)""",
            {"source": source_id, "explainer": explainer},
        ).fetchall()}
        ids = [f for f in ids if f not in done]
    return [int(f) for f in ids]


def chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), max(1, size)):
        yield list(ids[i:i + size])


# ---------------------------------------------------------------------------------------------
# prepare (the writer process)


@dataclass
class SkippedFeature:
    feature_id: int
    status: str  # 'dead' | 'rare'
    reason: str


@dataclass
class PreparedChunk:
    source_id: str
    feature_ids: list[int]
    examples: list[FeatureExamples]
    skipped: list[SkippedFeature] = field(default_factory=list)


def prepare_chunk(con, params: LabelParams, feature_ids: Sequence[int]) -> PreparedChunk:
    """Sample the chunk's windows (one SQL statement, written to `examples`) and load them."""
    ids = sorted({int(f) for f in feature_ids})
    report = sample_examples(con, params.source_id, ids, params.sampling)
    skipped = []
    if report.skipped:
        reasons = dict(con.execute(
            "SELECT feature_id, skip_reason FROM features WHERE source_id = $source "
            "AND feature_id IN (SELECT unnest($f::INTEGER[]))",
            {"source": params.source_id, "f": report.skipped},
        ).fetchall())
        for f in report.dead:
            skipped.append(SkippedFeature(f, "dead", reasons.get(f) or "no activations"))
        for f in report.rare:
            skipped.append(SkippedFeature(f, "rare", reasons.get(f) or "too few active sequences"))
    loaded = load_examples(con, params.source_id, [f for f in ids if f not in set(report.skipped)])
    if params.logit_lens and loaded and is_llm_explainer(params.explainer):
        attach_promoted_tokens(con, params.source_id, loaded, params.logit_lens)
    return PreparedChunk(params.source_id, ids, [loaded[f] for f in sorted(loaded)],
                         sorted(skipped, key=lambda s: s.feature_id))


def attach_promoted_tokens(con, source_id: str, examples: dict[int, FeatureExamples], k: int) -> None:
    """Each feature's k most promoted tokens (logit lens), from `features.promoted_tokens` when
    stored with at least k, else computed with the source's model and stored."""
    from featurescribe.labelers.logit_lens import promoted_tokens

    have = dict(con.execute(
        "SELECT feature_id, promoted_tokens FROM features WHERE source_id = $s AND "
        "feature_id IN (SELECT unnest($f::INTEGER[])) AND len(promoted_tokens) >= $k",
        {"s": source_id, "f": sorted(examples), "k": k}).fetchall())
    missing = [f for f in sorted(examples) if f not in have]
    if missing:
        cur = con.execute("SELECT * FROM sources WHERE source_id = ?", [source_id])
        source = dict(zip([d[0] for d in cur.description], cur.fetchone()))
        new = promoted_tokens(source, missing, k)
        lens = pa.table({"feature_id": pa.array(list(new), pa.int32()),  # noqa: F841 (read by the SQL)
                         "tokens": pa.array(list(new.values()), pa.list_(pa.string()))})
        con.execute("UPDATE features f SET promoted_tokens = t.tokens FROM lens t "
                    "WHERE f.source_id = ? AND f.feature_id = t.feature_id", [source_id])
        have.update(new)
    for f, fe in examples.items():
        fe.promoted = list(have[f])[:k]


# ---------------------------------------------------------------------------------------------
# compute (async; no database)


@dataclass
class ExplanationRow:
    """An explanation as `explanations` stores it: an ok one, or a failed one (text '')."""

    explanation: Explanation
    status: str = "ok"  # 'ok' | 'failed'
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
    stopped_at_budget: bool = False
    spent_usd: float = 0.0


def _new_id() -> str:
    return uuid.uuid4().hex


def _make_clients(params: LabelParams, store, budget, run_id):
    """(explainer client or None, simulator client or None); one client when both are the same."""
    from featurescribe.llm.client import make_client

    def make(spec):
        return make_client(spec, store=store, run_id=run_id, budget=budget,
                           use_cache=params.use_cache, concurrency=params.concurrency)

    exp_client = make(params.explainer) if is_llm_explainer(params.explainer) else None
    sim_kind, _ = parse_backend_spec(params.simulator)
    sim_client = None
    if sim_kind in ("openai", "anthropic", "local"):
        sim_client = exp_client if (exp_client is not None and exp_client.spec == params.simulator) \
            else make(params.simulator)
    return exp_client, sim_client


async def compute_chunk(prepared: PreparedChunk, params: LabelParams, *, store=None,
                        budget=None, run_id: str | None = None, clients=None) -> ChunkResult:
    """Explain and score every feature of the chunk, all at once under the client's concurrency.

    `store` is the CallStore the LLM clients record to and read the cache from (a DuckDB-backed
    CallStore, or an in-memory one whose rows `write_chunk` flushes); `budget` a shared
    `llm.budget.Budget` (or a number of USD). `clients`, when given, is the pair (explainer client,
    simulator client) to use instead of making them here (the caller then closes them).
    """
    from featurescribe.llm.budget import Budget
    from featurescribe.scorers import make_simulator, score_explanations

    if budget is not None and not isinstance(budget, Budget):
        budget = Budget(float(budget))
    result = ChunkResult(prepared.source_id, skipped=list(prepared.skipped))
    own_clients = clients is None
    exp_client, sim_client = _make_clients(params, store, budget, run_id) if own_clients else clients
    distinct_clients = list({id(c): c for c in (exp_client, sim_client) if c is not None}.values())
    spent_before = sum(getattr(c, "spent_usd", 0.0) for c in distinct_clients)
    try:
        explainer = make_explainer(params.explainer, client=exp_client, method=params.method_name,
                                   max_windows=params.explain_windows)
        simulator = make_simulator(params.simulator, client=sim_client)
        n = params.n_candidates
        by_key = {(fe.source_id, fe.feature_id): fe for fe in prepared.examples}

        def record(fe: FeatureExamples, oc: ExplainOutcome) -> ExplanationRow:
            e = Explanation(explanation_id=_new_id(), source_id=fe.source_id, feature_id=fe.feature_id,
                            text=oc.text if oc.ok else "", explainer=explainer.spec,
                            method=params.method_name, candidate=oc.candidate, run_id=run_id)
            return ExplanationRow(e, "ok" if oc.ok else "failed", False, oc.error)

        async def score(rows: Sequence[ExplanationRow], scorers, split: str,
                        others: dict[str, str] | None) -> tuple[list[ScoreResult], list[str], bool]:
            """Score each explanation on its own (so a budget stop keeps what finished)."""
            out: list[ScoreResult] = []
            errors: list[str] = []
            stopped = False

            async def one(row: ExplanationRow):
                nonlocal stopped
                e = row.explanation
                try:
                    res = await score_explanations(
                        [e], {(e.source_id, e.feature_id): by_key[(e.source_id, e.feature_id)]},
                        simulator=simulator, client=sim_client, scorers=list(scorers), split=split,
                        other_explanations={e.explanation_id: others[e.explanation_id]}
                        if others and e.explanation_id in others else None)
                except BudgetExceeded:
                    stopped = True
                    return
                out.extend(res)
                errors.extend(f"{f.scorer}: {f.error}" for f in res.failures)

            await asyncio.gather(*(one(r) for r in rows))
            return out, errors, stopped

        # 1. explain every feature (candidates of all features at once)
        async def explain(fe: FeatureExamples) -> list[ExplainOutcome]:
            return await explainer.explain(fe, n)

        outcomes = await asyncio.gather(*(explain(fe) for fe in prepared.examples))
        per_feature: dict[int, list[ExplanationRow]] = {}
        for fe, ocs in zip(prepared.examples, outcomes):
            if any(oc.stopped for oc in ocs):
                result.not_done.append(fe.feature_id)
                result.stopped_at_budget = True
                continue
            rows = [record(fe, oc) for oc in ocs]
            per_feature[fe.feature_id] = rows
            result.explanations.extend(rows)

        # 2. choose among candidates on `valid` (simulation scorer), or take the only one
        chosen: dict[int, ExplanationRow] = {}
        valid_rows = []
        for f, rows in per_feature.items():
            ok = [r for r in rows if r.status == "ok"]
            if not ok:
                errs = sorted({r.error for r in rows if r.error})
                result.failed[f] = "explanation failed: " + ("; ".join(errs) or "no answer")
            elif len(ok) == 1:
                chosen[f] = ok[0]
            else:
                valid_rows.extend(ok)
        if valid_rows:
            vscores, _, stopped = await score(valid_rows, ("simulation",), "valid",
                                              _rotate_others(valid_rows, by_candidate=True))
            result.scores.extend(vscores)
            result.stopped_at_budget |= stopped
            value = {s.explanation_id: s.value for s in vscores if s.scorer == "simulation"}
            for f, rows in per_feature.items():
                ok = [r for r in rows if r.status == "ok"]
                if len(ok) < 2:
                    continue
                scored = [r for r in ok if r.explanation.explanation_id in value]
                if not scored:  # no candidate could be scored on valid: take the first one
                    scored = ok[:1]
                best = max(scored, key=lambda r: (value.get(r.explanation.explanation_id, float("-inf")),
                                                  -r.explanation.candidate))
                chosen[f] = best
        for row in chosen.values():
            row.chosen = True

        # 3. score the chosen explanations on `test`; the shuffled baseline rotates by one
        test_rows = [chosen[f] for f in sorted(chosen)]
        tscores, errors, stopped = await score(test_rows, params.scorers, "test", _rotate_others(test_rows))
        result.scores.extend(tscores)
        result.stopped_at_budget |= stopped
        scored_ids = {s.explanation_id for s in tscores}
        for f in sorted(chosen):
            if chosen[f].explanation.explanation_id in scored_ids:
                result.labelled.append(f)
            elif stopped:
                result.not_done.append(f)
            else:
                result.failed[f] = "scoring failed: " + ("; ".join(errors) or "no score")
    finally:
        if own_clients:
            for c in distinct_clients:
                await c.aclose()
    if budget is not None:
        result.stopped_at_budget |= budget.stopped
    # this chunk's spend (clients handed in may have served earlier chunks)
    result.spent_usd = sum(getattr(c, "spent_usd", 0.0) for c in distinct_clients) - spent_before
    result.labelled.sort()
    result.not_done.sort()
    return result


def _rotate_others(rows: Sequence[ExplanationRow], by_candidate: bool = False) -> dict[str, str]:
    """Each explanation's shuffled baseline: an explanation of the next feature (rotated by one),
    the same candidate number when `by_candidate`. Empty with fewer than two features."""
    by_feature: dict[int, list[ExplanationRow]] = {}
    for r in rows:
        by_feature.setdefault(r.explanation.feature_id, []).append(r)
    feats = sorted(by_feature)
    if len(feats) < 2:
        return {}
    out = {}
    for i, f in enumerate(feats):
        nxt = by_feature[feats[(i + 1) % len(feats)]]
        for r in by_feature[f]:
            other = nxt[0]
            if by_candidate:
                same = [o for o in nxt if o.explanation.candidate == r.explanation.candidate]
                other = same[0] if same else nxt[0]
            out[r.explanation.explanation_id] = other.explanation.text
    return out


# ---------------------------------------------------------------------------------------------
# write (the writer process, one transaction)


@dataclass
class ChunkCounts:
    explanations: int = 0
    scores: int = 0
    ledger_rows: int = 0


def write_chunk(con, result: ChunkResult, *, run_id: str | None = None, calls=None) -> ChunkCounts:
    """Write a computed chunk in one transaction: explanations, scores and simulations, and the
    ledger rows and cache entries of `calls` when it is a store with `flush_to(con)` (an
    in-memory CallStore; a DuckDB-backed one writes its rows itself).

    A feature that gets a new chosen explanation has the older explanations by the same
    explainer and method marked not chosen.
    """
    from featurescribe.store.results import save_scores

    counts = ChunkCounts()
    rows = result.explanations
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    con.execute("BEGIN TRANSACTION")
    try:
        new_chosen = [r.explanation for r in rows if r.chosen]
        if new_chosen:
            keys = pa.table({
                "feature_id": pa.array([e.feature_id for e in new_chosen], pa.int32()),
                "explainer": pa.array([e.explainer for e in new_chosen], pa.string()),
                "method": pa.array([e.method for e in new_chosen], pa.string()),
            })
            view = f"_chosen_{uuid.uuid4().hex}"
            con.register(view, keys)
            try:
                con.execute(
                    f"UPDATE explanations e SET chosen = false FROM {view} k "
                    "WHERE e.source_id = ? AND e.feature_id = k.feature_id "
                    "AND e.explainer = k.explainer AND e.method = k.method AND e.chosen",
                    [result.source_id])
            finally:
                con.unregister(view)
        if rows:
            counts.explanations = insert_arrow(con, "explanations", pa.table({
                "explanation_id": pa.array([r.explanation.explanation_id for r in rows], pa.string()),
                "source_id": pa.array([r.explanation.source_id for r in rows], pa.string()),
                "feature_id": pa.array([r.explanation.feature_id for r in rows], pa.int32()),
                "text": pa.array([r.explanation.text for r in rows], pa.string()),
                "explainer": pa.array([r.explanation.explainer for r in rows], pa.string()),
                "method": pa.array([r.explanation.method for r in rows], pa.string()),
                "run_id": pa.array([r.explanation.run_id or run_id for r in rows], pa.string()),
                "created_at": pa.array([now] * len(rows), pa.timestamp("us")),
                "candidate": pa.array([r.explanation.candidate for r in rows], pa.int32()),
                "chosen": pa.array([r.chosen for r in rows], pa.bool_()),
                "status": pa.array([r.status for r in rows], pa.string()),
                "error": pa.array([r.error for r in rows], pa.string()),
            }))
        counts.scores = save_scores(con, result.scores, run_id=run_id)
        if calls is not None and hasattr(calls, "flush_to"):
            counts.ledger_rows = int(calls.flush_to(con) or 0)
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except Exception:
            pass
        raise
    return counts


# ---------------------------------------------------------------------------------------------
# a whole run, for the command


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

    def add(self, result: ChunkResult, counts: ChunkCounts) -> None:
        self.labelled += result.labelled
        self.skipped += result.skipped
        self.failed.update(result.failed)
        self.not_done += result.not_done
        self.explanations_written += counts.explanations
        self.scores_written += counts.scores
        self.stopped_at_budget |= result.stopped_at_budget


def check_backends(params: LabelParams) -> None:
    """Fail before any work when an LLM backend cannot be used (no API key, unknown backend)."""
    from featurescribe.llm.client import check_backend

    for spec in {params.explainer, params.simulator}:
        if parse_backend_spec(spec)[0] in ("openai", "anthropic", "local"):
            check_backend(spec)


def run_label(db: str, params: LabelParams, *, progress: bool = True) -> LabelSummary:
    """A whole label run in this process: select, then prepare/compute/write chunk by chunk.

    Recorded in `runs` (flow 'label'; status 'completed', 'stopped' at the budget, or 'failed').
    """
    from featurescribe.llm.budget import Budget
    from featurescribe.progress import Progress
    from featurescribe.store import runs as runs_sql
    from featurescribe.store.connection import open_db
    from featurescribe.store.llm_calls import CallStore
    from featurescribe.semantic.embed import embed_new_labels

    check_backends(params)
    con = open_db(db, create=False)
    try:
        all_ids = select_features(con, params.source_id, params.features, skip_done=False)
        ids = select_features(con, params.source_id, params.features, explainer=params.explainer,
                              skip_done=params.skip_done)
        run_id = f"label-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        summary = LabelSummary(run_id, params.source_id, params.explainer, params.simulator,
                               n_selected=len(all_ids), already_done=len(all_ids) - len(ids))
        runs_sql.insert_run(con, run_id, "label", params.as_dict(), None)
        store = CallStore(con)
        budget = Budget(params.budget_usd)

        async def main() -> None:
            clients = _make_clients(params, store, budget, run_id)
            try:
                with Progress("label", total=len(ids), unit="features", enabled=progress) as bar:
                    for chunk_ids in chunks(ids, params.chunk_size):
                        if budget.exhausted:
                            summary.not_done += chunk_ids
                            summary.stopped_at_budget = True
                            continue
                        prepared = prepare_chunk(con, params, chunk_ids)
                        result = await compute_chunk(prepared, params, store=store, budget=budget,
                                                     run_id=run_id, clients=clients)
                        store.flush()
                        counts = write_chunk(con, result, run_id=run_id)
                        if result.explanations:  # labels land with their embeddings
                            embed_new_labels(con, result.source_id)
                        summary.add(result, counts)
                        bar.advance(len(chunk_ids))
            finally:
                for c in {id(c): c for c in clients if c is not None}.values():
                    await c.aclose()

        try:
            asyncio.run(main())
            store.close()
        except BaseException as err:
            try:
                store.close()
            finally:
                runs_sql.finish_run(con, run_id, "cancelled" if isinstance(err, KeyboardInterrupt)
                                    else "failed", first_error_line(err))
            raise
        summary.stopped_at_budget |= budget.stopped
        if summary.stopped_at_budget:
            summary.budget_message = (
                f"stopped at the budget: ${params.budget_usd:.4f} spent or reached; "
                f"{len(summary.not_done)} feature(s) left for a later run")
        spent, n_calls, n_cached = con.execute(
            "SELECT coalesce(sum(cost_usd), 0), count(*), count(*) FILTER (WHERE status = 'cached') "
            "FROM llm_calls WHERE run_id = ?", [run_id]).fetchone()
        summary.spent_usd, summary.llm_calls, summary.cached_calls = float(spent), int(n_calls), int(n_cached)
        row = con.execute(
            "SELECT avg(s.value) FROM scores s JOIN explanations e USING (explanation_id) "
            "WHERE s.run_id = ? AND s.scorer = 'simulation' AND s.split = 'test' AND e.chosen",
            [run_id]).fetchone()
        summary.mean_score = None if row[0] is None else float(row[0])
        runs_sql.finish_run(con, run_id, "stopped" if summary.stopped_at_budget else "completed",
                            summary.budget_message)
        return summary
    finally:
        con.close()
