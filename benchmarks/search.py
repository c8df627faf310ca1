"""Finding features: label embedding speed, semantic search latency and the browser's page times.

1. `embed_labels_per_s`: `featurescribe embed`'s path (read missing labels, embed in batches of
   256 with the offline all-MiniLM-L6-v2 on the CPU, write vectors) over N labels of a small
   database (--quick 2,000, full 10,000), texts made from templates (1 in 4 repeated).
2. `search_latency_ms_p50` / `_p95`: `semantic.search.search()` over 1,000,000 synthetic labels
   with 384-dimensional vectors (real MiniLM vectors of 2,000 template labels plus noise, unit
   length), on a warm connection and model: embedding the query, ranking with the vector index
   beside the database (semantic/vector_index.py; `vector_index_build_s` to write it), the
   best-label check. 30 queries (--quick 15) after 3 warm-up ones. In the same run, the ranking
   alone with the index and with the SQL scan it replaces (`search_ranking_ms_p50`,
   `_sql_scan`), and how many queries got the same hits both ways.
3. `browse_first_page_ms` / `browse_feature_page_ms` (p50): the browse app served by uvicorn,
   measured through HTTP: the first page of the feature list (`/api/features`, best labels first)
   and feature pages (`/api/feature/S/ID` of alive features no label run sampled: windows,
   histogram and neighbours read from `activations`), on a database of 1,000,000 features with
   labels and 100M activation rows (--quick: 10M rows). Activations are generated in harvest
   order (sequence by sequence, the features interleaved), as a real harvest stores them: feature
   pages are measured on 5 features in that order (`browse_feature_page_ms_harvest_order`, every
   page scans all rows), then the rows are put in feature order (store/cluster.py, timed) and
   both figures measured on it.

The databases are generated inside DuckDB with range() and kept in --dir (default: a temporary
folder) so a second run reuses them.

    python benchmarks/search.py --quick
    python benchmarks/search.py

Last line: `search_latency_ms_p50: MS`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from featurescribe.llm.embeddings import embed_sync, make_embedder  # noqa: E402
from featurescribe.store.activation_store import insert_activations_query  # noqa: E402
from featurescribe.store import open_db  # noqa: E402

SOURCE = "12-res-sae1m"
EMBEDDER = "local:all-minilm-l6-v2"
TOPICS = ["digits in numbers", "closing brackets", "the word the", "Python keywords", "commas in lists",
          "names of cities", "dates and years", "verbs in the past tense", "plural nouns", "quotation marks",
          "function definitions", "mathematical operators", "the end of a sentence", "units of measure",
          "negation words", "questions", "HTML tags", "file paths", "variable names", "legal language"]
CONTEXTS = ["in code", "in English prose", "after a comma", "at the start of a line", "inside strings",
            "in lists", "in titles", "before a colon", "in comments", "in numbers", "near brackets",
            "in dialogue", "in tables", "in headings", "in URLs", "in emails", "in docstrings",
            "in error messages", "in math", "in poems", "in recipes", "in news", "in reviews",
            "in chat", "in config files", "in SQL", "in JSON", "in YAML", "in shell scripts",
            "in German text", "in French text", "in citations", "in footnotes", "in captions",
            "in addresses", "in prices", "in dates", "in tweets", "in abstracts", "in license text",
            "in logs", "in tests", "in imports", "in loops", "in conditions", "in returns", "in classes",
            "in decorators", "in type hints", "in assertions", "in exceptions", "in docs", "in markdown",
            "in LaTeX", "in CSV", "in XML", "in regexes", "in templates", "in prompts", "in songs",
            "in speeches", "in contracts", "in patents", "in forums", "in wikis", "in manuals",
            "in menus", "in tickets", "in commits", "in diffs", "in READMEs", "in changelogs",
            "in keys", "in values", "in headers", "in footers", "in queries", "in answers",
            "in questions", "in summaries", "in stories", "in letters", "in memos", "in slides",
            "in notes", "in maps", "in charts", "in code review", "in plans", "in specs", "in bugs",
            "in ads", "in labels", "in forms", "in invoices", "in schedules", "in scores"]
QUERIES = ["numbers", "brackets that close", "programming keywords", "places", "punctuation at the end",
           "time expressions", "past tense verbs", "markup", "negative words", "quotes in dialogue",
           "math symbols", "lists of items", "paths of files", "asking something", "legal terms"]


def fig(name: str, value) -> None:
    print(f"{name}: {value:.1f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def template_texts(n: int) -> list[str]:
    out = []
    for i in range(n):
        t, c = TOPICS[i % len(TOPICS)], CONTEXTS[(i // len(TOPICS)) % len(CONTEXTS)]
        out.append(f"{t} {c}")
    return out


def bench_embed(root: Path, n: int) -> float:
    """Labels per second of embed_labels (read, embed, write) on a fresh database."""
    from featurescribe.semantic.embed import embed_labels

    path = root / f"embed-{n}.duckdb"
    path.unlink(missing_ok=True)
    con = open_db(str(path))
    texts = template_texts(n * 3 // 4)
    texts += texts[: n - len(texts)]
    con.execute("""INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method, status)
                   SELECT 'e' || i, 's', i, t, 'x', 'm', 'ok' FROM (SELECT unnest(?) AS t,
                          unnest(range(?)) AS i)""", [texts, len(texts)])
    embedder = make_embedder()
    embed_sync(embedder, ["warm up"])  # model load and extraction are not the rate
    t0 = time.perf_counter()
    s = embed_labels(con, embedder, progress=False)
    dt = time.perf_counter() - t0
    con.close()
    assert s.embedded == n
    return n / dt


def build_labels(con, n_features: int, n_templates: int = 2000, chunk: int = 100_000) -> None:
    """Features, one chosen explanation each with a test simulation score, and its vector."""
    from featurescribe.store.embeddings import PendingText, write_embeddings

    texts = template_texts(n_templates)
    base = embed_sync(make_embedder(), texts)
    con.execute(f"""INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method,
                                             candidate, chosen, status)
                    SELECT 'e' || f, '{SOURCE}', f, ($t)[1 + f % {n_templates}], 'baseline:tokens', 'tokens',
                           0, true, 'ok'
                    FROM range({n_features}) t(f)""", {"t": texts})
    con.execute("""INSERT INTO scores (explanation_id, scorer, value, simulator, n_examples, split,
                                       baseline_shuffled, baseline_tokens)
                   SELECT explanation_id, 'simulation', (hash(feature_id, 's') % 1000) / 1000.0, 'lexical', 20,
                          'test', (hash(feature_id, 'b') % 200) / 1000.0 - 0.1, 0.1
                   FROM explanations""")
    rng = np.random.default_rng(0)
    for lo in range(0, n_features, chunk):
        ids = np.arange(lo, min(n_features, lo + chunk))
        vecs = base[ids % n_templates] + 0.08 * rng.standard_normal((ids.size, base.shape[1]), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        items = [PendingText(f"e{i}", SOURCE, int(i), "") for i in ids]
        write_embeddings(con, EMBEDDER, items, vecs)


def build_activations(con, n_features: int, n_rows: int, ctx: int = 64) -> None:
    """Sequences and activations in harvest order (sequence by sequence), ~8 active features a
    token, skewed densities (feature ids drawn as floor(n * u^2)), then exact feature statistics."""
    n_seqs = max(1, n_rows // (8 * (ctx - 1)))
    con.execute(f"""INSERT INTO sources (source_id, model_id, hook_name, layer, kind, width, n_tokens)
                    VALUES ('{SOURCE}', 'synthetic', 'blocks.12.hook_resid_post', 12, 'sae', {n_features},
                            {n_seqs * (ctx - 1)})""")
    con.execute(f"""INSERT INTO sequences (seq_id, token_ids, tokens)
                    SELECT s, [(hash(s, p) % 50000)::INTEGER FOR p IN range({ctx})],
                           [' t' || (hash(s, p) % 50000)::VARCHAR FOR p IN range({ctx})]
                    FROM range({n_seqs}) t(s)""")
    con.execute(f"INSERT INTO harvest_progress SELECT '{SOURCE}', s FROM range({n_seqs}) t(s)")
    per_seq = n_rows // n_seqs
    insert_activations_query(con, SOURCE, f"""
                    SELECT floor({n_features} * pow((hash(i, 1) % 1000003) / 1000003.0, 2))::INTEGER,
                           i // {per_seq}, (1 + hash(i, 2) % {ctx - 1})::INTEGER,
                           ((hash(i, 3) % 100000) / 1e4)::REAL + 0.01
                    FROM range({per_seq * n_seqs}) t(i)""")
    con.execute(f"""INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act, status)
                    SELECT '{SOURCE}', f::INTEGER, coalesce(n, 0), coalesce(n, 0) / {n_seqs * (ctx - 1)}, m, a,
                           CASE WHEN n > 0 THEN 'alive' ELSE 'dead' END
                    FROM range({n_features}) t(f)
                    LEFT JOIN (SELECT feature_id, count(*) AS n, max(act) AS m, avg(act) AS a
                               FROM activations GROUP BY 1) x ON x.feature_id = f""")


def database(root: Path, n_features: int, n_rows: int) -> str:
    path = root / f"browse-{n_features}-{n_rows}.duckdb"
    if path.exists():
        return str(path)
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    con = open_db(str(tmp))
    t0 = time.perf_counter()
    build_activations(con, n_features, n_rows)
    t1 = time.perf_counter()
    build_labels(con, n_features)
    con.execute("CHECKPOINT")
    con.close()
    os.rename(tmp, path)
    print(f"# built {path.name}: activations {t1 - t0:.0f} s, labels and vectors {time.perf_counter() - t1:.0f} s, "
          f"{path.stat().st_size / 1e9:.1f} GB", flush=True)
    return str(path)


def clustered(db: str) -> bool:
    from featurescribe.store.cluster import is_clustered

    con = open_db(db, read_only=True)
    try:
        return is_clustered(con, SOURCE)
    finally:
        con.close()


def cluster(db: str) -> None:
    from featurescribe.store.cluster import cluster_activations

    con = open_db(db)
    t0 = time.perf_counter()
    n = cluster_activations(con, SOURCE)
    con.close()
    print(f"# cluster_activations: {n:,} rows in feature order in {time.perf_counter() - t0:.0f} s", flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def build_index(db: str) -> float:
    """Seconds to write the vector index beside the database (search would on its first query)."""
    import shutil

    from featurescribe.semantic.vector_index import index_dir, open_index

    shutil.rmtree(Path(db + ".vectors"), ignore_errors=True)
    con = open_db(db, read_only=True)
    try:
        t0 = time.perf_counter()
        index = open_index(con, EMBEDDER)
        assert index is not None and index.folder == index_dir(db, EMBEDDER)
        return time.perf_counter() - t0
    finally:
        con.close()


def bench_search(db: str, n_queries: int) -> dict[str, float]:
    """Whole searches (query embedded, ranked with the vector index, best labels checked), and
    the ranking alone with the index and with the SQL scan, the same queries in one run; the
    index's hits are compared with the SQL scan's."""
    from featurescribe.semantic.search import rank_hits, search

    con = open_db(db, read_only=True)
    try:
        for q in QUERIES[:3]:
            search(con, q, k=10)
        total, ranking, in_sql, same = [], [], [], 0
        emb = make_embedder()
        for i in range(n_queries):
            q = QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}")
            t0 = time.perf_counter()
            hits = search(con, q, k=10)
            total.append(1000 * (time.perf_counter() - t0))
            qv = embed_sync(emb, [q])[0]
            t0 = time.perf_counter()
            ranked = rank_hits(con, EMBEDDER, qv, k=10)
            ranking.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            scanned = rank_hits(con, EMBEDDER, qv, k=10, use_index=False)
            in_sql.append(1000 * (time.perf_counter() - t0))
            assert len(hits) == 10 and [h.explanation_id for h in hits] == [h.explanation_id for h in ranked]
            same += [h.explanation_id for h in ranked] == [h.explanation_id for h in scanned]
    finally:
        con.close()
    return {"p50": pct(total, 50), "p95": pct(total, 95), "ranking": pct(ranking, 50), "sql": pct(in_sql, 50),
            "same": same}


def timed_get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
    return 1000 * (time.perf_counter() - t0)


def bench_browse(db: str, n_pages: int) -> tuple[float, float]:
    from featurescribe.web.server import serve_in_thread

    con = open_db(db, read_only=True)
    alive = [r[0] for r in con.execute(
        f"SELECT feature_id FROM features WHERE n_active >= 20 ORDER BY hash(feature_id) LIMIT {n_pages + 2}").fetchall()]
    con.close()
    running = serve_in_thread(db)
    try:
        timed_get(running.url + "/api/features?limit=50")  # warm: the connection's first reads
        first = [timed_get(running.url + "/api/features?limit=50") for _ in range(n_pages)]
        timed_get(f"{running.url}/api/feature/{SOURCE}/{alive[-1]}")
        feature = [timed_get(f"{running.url}/api/feature/{SOURCE}/{f}") for f in alive[:n_pages]]
    finally:
        running.stop()
    return statistics.median(first), statistics.median(feature)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10M activation rows instead of 100M; fewer queries")
    ap.add_argument("--dir", default=None, help="where the databases are kept (default: a temporary folder)")
    ap.add_argument("--features", type=int, default=1_000_000)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="fs-search-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    n_rows = 10_000_000 if args.quick else 100_000_000
    print(f"# {os.cpu_count()} CPUs; databases in {root}", flush=True)
    fig("embed_labels_per_s", bench_embed(root, 2_000 if args.quick else 10_000))
    db = database(root, args.features, n_rows)
    if not clustered(db):
        _, unclustered = bench_browse(db, 5)
        fig("browse_feature_page_ms_harvest_order", unclustered)
        cluster(db)
    first, feature = bench_browse(db, 10 if args.quick else 30)
    fig("browse_first_page_ms", first)
    fig("browse_feature_page_ms", feature)
    fig("vector_index_build_s", build_index(db))
    n_queries = 15 if args.quick else 30
    s = bench_search(db, n_queries)
    fig("search_ranking_ms_p50_sql_scan", s["sql"])
    fig("search_ranking_ms_p50", s["ranking"])
    print(f"search_same_hits_as_sql_scan: {s['same']}/{n_queries}", flush=True)
    fig("search_latency_ms_p95", s["p95"])
    fig("search_latency_ms_p50", s["p50"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
