"""The database schema as an ordered list of migrations.

A new database runs every migration; an older one runs those it lacks. The version a database
is at lives in `schema_version`. Never edit a released migration: append a new one.
"""

from __future__ import annotations

import duckdb

from featurescribe.store.activation_store import MIGRATION as ACTIVATIONS_MIGRATION
from featurescribe.store.embeddings import MIGRATION as EMBEDDINGS_MIGRATION
from featurescribe.store.transaction import transaction

# Version 1: the tables and view of DESIGN.md.
_V1 = [
    """
    CREATE TABLE IF NOT EXISTS sources (
        source_id   VARCHAR PRIMARY KEY,
        model_id    VARCHAR NOT NULL,
        hook_name   VARCHAR NOT NULL,
        layer       INTEGER NOT NULL,
        kind        VARCHAR NOT NULL CHECK (kind IN ('neuron', 'sae')),
        width       INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS sequences (
        seq_id      BIGINT PRIMARY KEY,
        token_ids   INTEGER[] NOT NULL,
        tokens      VARCHAR[] NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS activations (
        source_id   VARCHAR NOT NULL,
        feature_id  INTEGER NOT NULL,
        seq_id      BIGINT NOT NULL,
        pos         INTEGER NOT NULL,
        act         REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS features (
        source_id   VARCHAR NOT NULL,
        feature_id  INTEGER NOT NULL,
        n_active    BIGINT NOT NULL,
        frac_active DOUBLE NOT NULL,
        max_act     REAL,
        mean_act    REAL,
        PRIMARY KEY (source_id, feature_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS explanations (
        explanation_id VARCHAR PRIMARY KEY,
        source_id   VARCHAR NOT NULL,
        feature_id  INTEGER NOT NULL,
        text        VARCHAR NOT NULL,
        explainer   VARCHAR NOT NULL,
        method      VARCHAR NOT NULL,
        run_id      VARCHAR,
        created_at  TIMESTAMP DEFAULT current_timestamp
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS scores (
        explanation_id VARCHAR NOT NULL,
        scorer      VARCHAR NOT NULL,
        value       DOUBLE NOT NULL,
        simulator   VARCHAR,
        n_examples  INTEGER,
        details     JSON
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS examples (
        source_id   VARCHAR NOT NULL,
        feature_id  INTEGER NOT NULL,
        seq_id      BIGINT NOT NULL,
        start_pos   INTEGER NOT NULL,
        end_pos     INTEGER NOT NULL,
        split       VARCHAR NOT NULL CHECK (split IN ('explain', 'valid', 'test')),
        kind        VARCHAR NOT NULL CHECK (kind IN ('top', 'quantile', 'random'))
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS simulations (
        explanation_id VARCHAR NOT NULL,
        simulator   VARCHAR NOT NULL,
        seq_id      BIGINT NOT NULL,
        start_pos   INTEGER NOT NULL,
        split       VARCHAR NOT NULL,
        true_acts   FLOAT[] NOT NULL,
        predicted   FLOAT[] NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS llm_calls (
        call_id     VARCHAR PRIMARY KEY,
        run_id      VARCHAR,
        backend     VARCHAR NOT NULL,
        model       VARCHAR NOT NULL,
        purpose     VARCHAR,
        prompt_hash VARCHAR NOT NULL,
        input_tokens  INTEGER DEFAULT 0,
        output_tokens INTEGER DEFAULT 0,
        cost_usd    DOUBLE DEFAULT 0,
        latency_s   DOUBLE,
        status      VARCHAR NOT NULL,
        error       VARCHAR
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS runs (
        run_id      VARCHAR PRIMARY KEY,
        flow        VARCHAR NOT NULL,
        params      JSON,
        status      VARCHAR NOT NULL,
        started_at  TIMESTAMP DEFAULT current_timestamp,
        finished_at TIMESTAMP
    )
    """,
    """
    CREATE OR REPLACE VIEW labels AS
    SELECT e.source_id, e.feature_id, e.text AS explanation, s.value AS score, s.scorer,
           e.explainer, s.simulator
    FROM explanations e JOIN scores s USING (explanation_id)
    QUALIFY row_number() OVER (PARTITION BY e.source_id, e.feature_id
                               ORDER BY s.scorer = 'simulation' DESC, s.value DESC) = 1
    """,
]

# Version 2: what the pipeline needs beyond the contract: harvest bookkeeping, feature status,
# example metadata, score splits and baselines, the response cache, call details, LLM batches.
_V2 = [
    # sources: how the activations were made
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS site VARCHAR",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS threshold DOUBLE",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS sae_path VARCHAR",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS corpus VARCHAR",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS ctx INTEGER",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS n_tokens BIGINT",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS params JSON",
    "ALTER TABLE sources ADD COLUMN IF NOT EXISTS created_at TIMESTAMP",
    # sequences: which tokenizer and corpus made them, so a second harvest can reuse them
    "ALTER TABLE sequences ADD COLUMN IF NOT EXISTS tokenizer_id VARCHAR",
    "ALTER TABLE sequences ADD COLUMN IF NOT EXISTS corpus VARCHAR",
    "ALTER TABLE sequences ADD COLUMN IF NOT EXISTS corpus_index BIGINT",
    # features: dead or too-rare features are marked with a reason, not dropped
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS status VARCHAR",
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS skip_reason VARCHAR",
    # explanations: candidates, failures
    "ALTER TABLE explanations ADD COLUMN IF NOT EXISTS candidate INTEGER",
    "ALTER TABLE explanations ADD COLUMN IF NOT EXISTS chosen BOOLEAN",
    "ALTER TABLE explanations ADD COLUMN IF NOT EXISTS status VARCHAR",
    # scores: which split, and the baselines read beside the score
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS split VARCHAR",
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS baseline_shuffled DOUBLE",
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS baseline_tokens DOUBLE",
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS run_id VARCHAR",
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS created_at TIMESTAMP",
    # examples: rank inside its kind, quantile bin, the window's peak
    "ALTER TABLE examples ADD COLUMN IF NOT EXISTS rank INTEGER",
    "ALTER TABLE examples ADD COLUMN IF NOT EXISTS quantile INTEGER",
    "ALTER TABLE examples ADD COLUMN IF NOT EXISTS max_act REAL",
    "ALTER TABLE simulations ADD COLUMN IF NOT EXISTS kind VARCHAR",
    "ALTER TABLE simulations ADD COLUMN IF NOT EXISTS run_id VARCHAR",
    # llm_calls: when, cached or not, batch
    "ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS created_at TIMESTAMP",
    "ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS cached BOOLEAN",
    "ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS attempt INTEGER",
    "ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS batch_id VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS prefect_flow_run_id VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS error VARCHAR",
    """
    CREATE TABLE IF NOT EXISTS llm_cache (
        cache_key   VARCHAR PRIMARY KEY,
        backend     VARCHAR NOT NULL,
        model       VARCHAR NOT NULL,
        response    JSON NOT NULL,
        created_at  TIMESTAMP DEFAULT current_timestamp
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS harvest_progress (
        source_id   VARCHAR NOT NULL,
        seq_id      BIGINT NOT NULL,
        PRIMARY KEY (source_id, seq_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS llm_batches (
        batch_id    VARCHAR PRIMARY KEY,
        provider    VARCHAR NOT NULL,
        run_id      VARCHAR,
        purpose     VARCHAR,
        status      VARCHAR NOT NULL,
        n_requests  INTEGER,
        input_file_id VARCHAR,
        payload     JSON,
        created_at  TIMESTAMP DEFAULT current_timestamp,
        finished_at TIMESTAMP
    )
    """,
    # labels: the best explanation per feature; simulation scores on the test split come first,
    # and each carries its baselines and lift over the shuffled-explanation baseline.
    """
    CREATE OR REPLACE VIEW labels AS
    SELECT e.source_id, e.feature_id, e.text AS explanation, s.value AS score, s.scorer,
           e.explainer, s.simulator, s.split,
           s.baseline_shuffled, s.baseline_tokens,
           s.value - s.baseline_shuffled AS lift,
           e.explanation_id
    FROM explanations e JOIN scores s USING (explanation_id)
    WHERE coalesce(e.status, 'ok') = 'ok'
    QUALIFY row_number() OVER (
        PARTITION BY e.source_id, e.feature_id
        ORDER BY s.scorer = 'simulation' DESC, coalesce(s.split, 'test') = 'test' DESC,
                 s.value DESC, e.explanation_id) = 1
    """,
]

# Version 3: one row per request of a provider batch (label --batch), so a restarted run finds
# which requests are already in a batch, and how often each was tried, with SQL, at any scale.
_V3 = [
    """
    CREATE TABLE IF NOT EXISTS llm_batch_items (
        batch_id    VARCHAR NOT NULL,
        custom_id   VARCHAR NOT NULL,
        purpose     VARCHAR,
        structured  BOOLEAN,
        wrapped     BOOLEAN,
        status      VARCHAR NOT NULL,
        error       VARCHAR
    )
    """,
]

# the labels view since version 4 (test-split scores only), with its lift
_LABELS_VIEW = """
    CREATE OR REPLACE VIEW labels AS
    SELECT e.source_id, e.feature_id, e.text AS explanation, s.value AS score, s.scorer,
           e.explainer, s.simulator, s.split,
           s.baseline_shuffled, s.baseline_tokens,
           {lift} AS lift,
           e.explanation_id
    FROM explanations e JOIN scores s USING (explanation_id)
    WHERE coalesce(e.status, 'ok') = 'ok' AND coalesce(s.split, 'test') = 'test'
    QUALIFY row_number() OVER (
        PARTITION BY e.source_id, e.feature_id
        ORDER BY s.scorer = 'simulation' DESC, s.value DESC, e.explanation_id) = 1
    """

# Version 4: why a failed explanation has no text (the last error the LLM layer gave), so failures
# can be read with SQL beside the ledger.
# The labels view now reads test-split scores only: a candidate's `valid` score (the split it was
# chosen on) never stands in for a test score that failed.
_V4 = [
    "ALTER TABLE explanations ADD COLUMN IF NOT EXISTS error VARCHAR",
    _LABELS_VIEW.format(lift="s.value - s.baseline_shuffled"),
]

# Version 5: the tokens a feature's output direction promotes most (label --logit-lens).
_V5 = [
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS promoted_tokens VARCHAR[]",
]

# Version 6: what a feature does when steered (featurescribe steer, the intervention scorer):
# its TokenChange output effects beside promoted_tokens, and the intervention scorer's audit rows
# (one per neutral prompt: the two continuations, their order, the judge's pick).
_V6 = [
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS output_rising VARCHAR[]",
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS output_falling VARCHAR[]",
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS output_effects JSON",
    """
    CREATE TABLE IF NOT EXISTS interventions (
        explanation_id VARCHAR NOT NULL,
        judge       VARCHAR NOT NULL,
        split       VARCHAR NOT NULL,
        role        VARCHAR NOT NULL CHECK (role IN ('explanation', 'shuffled')),
        prompt_index INTEGER NOT NULL,
        prompt      VARCHAR NOT NULL,
        strength    DOUBLE NOT NULL,
        kl          DOUBLE,
        steered     VARCHAR NOT NULL,
        unsteered   VARCHAR NOT NULL,
        steered_first BOOLEAN NOT NULL,
        picked      VARCHAR NOT NULL CHECK (picked IN ('A', 'B', 'tie')),
        correct     DOUBLE NOT NULL,
        run_id      VARCHAR
    )
    """,
]

# Version 7: label embeddings for semantic search and the browser (store/embeddings.py).
_V7 = list(EMBEDDINGS_MIGRATION)

# Version 8: what an OpenAI-compatible server + model was found to take (llm/negotiation.py), so
# a later run starts with the structured-output form, logprobs and parameters that work there.
_V8 = [
    """
    CREATE TABLE IF NOT EXISTS llm_capabilities (
        base_url        VARCHAR NOT NULL,
        model           VARCHAR NOT NULL,
        structured      VARCHAR NOT NULL,
        logprobs        BOOLEAN NOT NULL,
        dropped_params  VARCHAR[] NOT NULL,
        updated_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
        PRIMARY KEY (base_url, model)
    )
    """,
]

# Version 9: the process of a running run (host, pid), so that a run starting beside another
# (runs hold the database only while they write) marks `interrupted` only runs whose process is gone.
_V9 = [
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER",
]
# Version 10: what became of a run's LLM calls, counted by kind and group (llm/outcomes.py), so a
# run's record tells the server's refusals from the model's own unusable answers.
_V10 = ["ALTER TABLE runs ADD COLUMN IF NOT EXISTS call_outcomes JSON"]

# Version 11 (issue 16): cheaper labels. `scores.baseline_population` is the shuffled baseline of a
# score that has none of its own (label --baseline sample:N): the mean over its chunk's scores that
# have one, and the labels view's lift falls back to it. `llm_calls` splits the input tokens the
# provider read from its prompt cache (`cached_input_tokens`) and wrote to it
# (`cache_write_tokens`, Anthropic), priced as such. `features.intruder` is the accuracy of the
# intruder gate (label --gate intruder:T); a feature below T gets status 'gated'.
_V11 = [
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS baseline_population DOUBLE",
    "ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS cached_input_tokens BIGINT",
    "ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS cache_write_tokens BIGINT",
    "ALTER TABLE features ADD COLUMN IF NOT EXISTS intruder DOUBLE",
    _LABELS_VIEW.format(lift="s.value - coalesce(s.baseline_shuffled, s.baseline_population)"),
]

# Version 12: activations stored with an integer source key under a view of the same name and
# columns (store/activation_store.py); the rows of older databases move over.
_V12 = list(ACTIVATIONS_MIGRATION)

MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10, _V11, _V12]
SCHEMA_VERSION = len(MIGRATIONS)

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL,
    applied_at TIMESTAMP DEFAULT current_timestamp
)
"""


def current_version(con) -> int:
    """The schema version of an open database, 0 for an empty one (call it outside a transaction:
    an empty database's missing table would abort one)."""
    try:  # a first query of information_schema on a new opening takes ~6 ms; this one under 1 ms
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    except duckdb.CatalogException:
        return 0
    return int(row[0] or 0)


def migrate(con, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations up to `target` in one transaction; return the version."""
    version = current_version(con)
    if version >= target:
        return version
    script = [VERSION_TABLE]
    for v in range(version + 1, target + 1):
        script.extend(MIGRATIONS[v - 1])
        script.append(f"INSERT INTO schema_version (version) VALUES ({int(v)})")
    with transaction(con):
        # one call, not ~80: each call from Python waits for the GIL, which a harvest's corpus
        # reader (starting beside it) holds for whole module parses
        con.execute(";\n".join(script))
    return target
