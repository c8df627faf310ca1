"""Sampling speed: the examples of 16,384 features over ~50M activation rows.

The database is synthetic and generated inside DuckDB with range(): sequences of 64 tokens, and
activations spread over the features with a skewed density (a few dense features, many sparse
ones, some dead), at random positions with random values. The figure is the wall time of
`sample_examples` (the SQL that picks top, quantile and random windows and writes `examples`)
for every feature, in batches of --batch features, plus `load_examples` for one label chunk.

    python benchmarks/sampling.py            # 16,384 features, ~50M rows
    python benchmarks/sampling.py --quick    # 16,384 features, ~5M rows

Last line: `sampling_seconds: S`.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from featurescribe.store.activation_store import insert_activations_query  # noqa: E402
from featurescribe.store import open_db  # noqa: E402
from featurescribe.store.sampling import SamplingConfig, load_examples, sample_examples  # noqa: E402


def build_sequences(con, source_id: str, n_features: int, n_seqs: int, ctx: int, vocab: int = 50000) -> None:
    """The `sources` row and `n_seqs` sequences of `ctx` pseudo-random tokens."""
    con.execute(
        "INSERT INTO sources (source_id, model_id, hook_name, layer, kind, width) "
        "VALUES (?, 'synthetic', 'blocks.0.hook', 0, 'sae', ?)", [source_id, n_features])
    con.execute(f"""
        INSERT INTO sequences (seq_id, token_ids, tokens)
        SELECT s, [(hash(s, p) % {vocab})::INTEGER FOR p IN range({ctx})],
               [' t' || (hash(s, p) % {vocab})::VARCHAR FOR p IN range({ctx})]
        FROM range({n_seqs}) t(s)""")


def build(con, n_features: int, n_rows: int, n_seqs: int, ctx: int) -> None:
    build_sequences(con, "0-bench", n_features, n_seqs, ctx)
    # feature f gets a share of the rows proportional to 1 / (1 + f % 97): skewed densities;
    # every 64th feature is dead
    insert_activations_query(con, "0-bench", f"""
        WITH w AS (SELECT f, 1.0 / (1 + f % 97) AS w FROM range({n_features}) t(f) WHERE f % 64 <> 63),
             c AS (SELECT f, w, sum(w) OVER (ORDER BY f) AS cw, sum(w) OVER () AS tw FROM w),
             k AS (SELECT f, round((cw - w) / tw * {n_rows})::BIGINT AS lo,
                          round(cw / tw * {n_rows})::BIGINT AS hi FROM c)
        SELECT f::INTEGER, (hash(i, 1) % {n_seqs})::BIGINT, (hash(i, 2) % {ctx})::INTEGER,
               ((hash(i, 3) % 1000000) / 1e5)::REAL + 0.01
        FROM k, range(k.lo, k.hi) t(i)""")
    con.execute(f"""
        INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act)
        SELECT '0-bench', f::INTEGER, coalesce(n, 0), coalesce(n, 0) / {n_seqs * ctx}, m, a
        FROM range({n_features}) t(f)
        LEFT JOIN (SELECT feature_id, count(*) AS n, max(act) AS m, avg(act) AS a
                   FROM activations GROUP BY 1) x ON x.feature_id = f""")


def cpu_seconds() -> float:
    """This process's CPU time, DuckDB's threads included: what a loaded machine does not inflate."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reference_top20_seconds(con) -> float:
    """The floor the issue compares against: one top-20-per-feature query over every row."""
    t0 = time.perf_counter()
    con.execute("""SELECT count(*) FROM (SELECT feature_id, seq_id, act FROM activations
                   WHERE source_id = '0-bench' AND act > 0
                   QUALIFY row_number() OVER (PARTITION BY feature_id ORDER BY act DESC) <= 20)""").fetchall()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="~5M activation rows instead of ~50M")
    ap.add_argument("--features", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4096, help="features per sampling statement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-limit", default=None, help="DuckDB memory_limit while sampling (a label run's: 128MB above its indexes)")
    args = ap.parse_args()
    n_rows = args.rows or (5_000_000 if args.quick else 50_000_000)
    n_seqs = 8192 if args.quick else 32768
    ctx = 64
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.duckdb")
        con = open_db(db)
        if args.threads:
            con.execute(f"SET threads = {args.threads}")
        t0 = time.perf_counter()
        build(con, args.features, n_rows, n_seqs, ctx)
        con.execute("CHECKPOINT")
        n_act = con.execute("SELECT count(*) FROM activations").fetchone()[0]
        print(f"built {n_act:,} activation rows, {n_seqs:,} sequences of {ctx} tokens, "
              f"{args.features:,} features in {time.perf_counter() - t0:.1f} s", flush=True)

        if args.memory_limit:
            con.execute(f"SET memory_limit = '{args.memory_limit}'")
        cfg = SamplingConfig()
        feats = list(range(args.features))
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        sampled = dead = rare = windows = 0
        for i in range(0, len(feats), args.batch):
            r = sample_examples(con, "0-bench", feats[i:i + args.batch], cfg)
            sampled, dead, rare = sampled + len(r.sampled), dead + len(r.dead), rare + len(r.rare)
            windows += r.n_windows
        took = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        print(f"sampled {sampled:,} features ({dead:,} dead, {rare:,} rare), {windows:,} windows, "
              f"batches of {args.batch}")
        t1 = time.perf_counter()
        ex = load_examples(con, "0-bench", feats[:256])
        load_s = time.perf_counter() - t1
        n_win = sum(len(e.windows) for e in ex.values())
        print(f"load_examples for a chunk of 256 features ({n_win:,} windows): {load_s:.2f} s")
        print(f"features_per_second: {sampled / took:,.0f}")
        cpu1 = cpu_seconds()
        ref = reference_top20_seconds(con)
        ref_cpu = cpu_seconds() - cpu1
        print(f"reference: one top-20-per-feature QUALIFY query over the same rows {ref:.2f} s "
              f"({ref_cpu:.2f} s CPU); sampling_vs_reference: {took / ref:.1f} ({cpu / ref_cpu:.1f} in CPU time)")
        print(f"sampling_cpu_seconds: {cpu:.2f}")
        con.close()
    print(f"sampling_seconds: {took:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
