"""The vector index beside the database (semantic/vector_index.py): a float16 first pass and an
exact float32 rescoring give the exact top k; it follows the labels; it never blocks a search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featurescribe.cli import main
from featurescribe.semantic.search import rank_hits
from featurescribe.semantic.vector_index import index_dir, open_index
from featurescribe.store import open_db
from featurescribe.store.embeddings import PendingText, write_embeddings

EMBEDDER = "local:all-minilm-l6-v2"
N, CLUSTERS, DIM = 6000, 40, 384


def source_of(i: int) -> str:
    return "6-mlp" if i % 3 == 0 else "6-res-sae16"


def add_labels(con, rng, lo: int, hi: int, centres: np.ndarray) -> np.ndarray:
    """Features lo..hi-1, one chosen and scored explanation each, with vectors in tight clusters
    (many near-ties: what the exactness guarantee is about)."""
    con.execute("""INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method,
                                             candidate, chosen, status)
                   SELECT 'e' || f, CASE WHEN f % 3 = 0 THEN '6-mlp' ELSE '6-res-sae16' END, f, 'label ' || f,
                          'baseline:tokens', 'tokens', 0, true, 'ok' FROM range(?, ?) t(f)""", [lo, hi])
    con.execute("""INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act)
                   SELECT CASE WHEN f % 3 = 0 THEN '6-mlp' ELSE '6-res-sae16' END, f, 5, 0.01, 1.0, 0.5
                   FROM range(?, ?) t(f)""", [lo, hi])
    con.execute("""INSERT INTO scores (explanation_id, scorer, value, simulator, n_examples, split, baseline_shuffled)
                   SELECT explanation_id, 'simulation', (hash(feature_id) % 1000) / 1000.0, 'lexical', 20, 'test', 0
                   FROM explanations WHERE feature_id >= ? AND feature_id < ?""", [lo, hi])
    ids = np.arange(lo, hi)
    vecs = centres[ids % CLUSTERS] + 0.03 * rng.standard_normal((ids.size, DIM), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    write_embeddings(con, EMBEDDER, [PendingText(f"e{i}", source_of(i), int(i), "") for i in ids], vecs)
    return vecs


@pytest.fixture
def vec_db(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURESCRIBE_VECTOR_INDEX_MIN_ROWS", "100")
    path = str(tmp_path / "vec.duckdb")
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    con = open_db(path)
    add_labels(con, rng, 0, N, centres)
    con.close()
    return path, rng, centres


def query_near(rng, centres, c: int) -> np.ndarray:
    v = centres[c] + 0.5 * rng.standard_normal(DIM, dtype=np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def exact_top(con, qv: np.ndarray, k: int, source: str | None) -> list[str]:
    """The exact ranking, computed here in float64 from the vectors in the database."""
    rows = con.execute("SELECT explanation_id, source_id, vec FROM label_embeddings").fetchall()
    scored = [(-float(np.asarray(v, np.float64) @ qv.astype(np.float64)), e) for e, s, v in rows
              if source is None or s == source]
    return [e for _, e in sorted(scored)[:k]]


def test_index_gives_the_exact_top_k_and_agrees_with_the_sql_scan(vec_db):
    path, rng, centres = vec_db
    con = open_db(path, read_only=True)
    try:
        for c, source in [(0, None), (1, None), (2, "6-mlp"), (3, "6-res-sae16"), (4, None)]:
            qv = query_near(rng, centres, c)
            hits = rank_hits(con, EMBEDDER, qv, k=25, source_id=source)
            assert [h.explanation_id for h in hits] == exact_top(con, qv, 25, source)
            in_sql = rank_hits(con, EMBEDDER, qv, k=25, source_id=source, use_index=False)
            # the SQL scan sums in float32: the same rows, the same scores to ~1e-6
            assert {h.explanation_id for h in hits} ^ {h.explanation_id for h in in_sql} <= {
                h.explanation_id for h in hits + in_sql if abs(h.similarity - hits[-1].similarity) < 1e-5}
            for h, s in zip(hits, in_sql):
                assert h.similarity == pytest.approx(s.similarity, abs=1e-5)
    finally:
        con.close()
    assert (index_dir(path, EMBEDDER) / "f16.npy").is_file()


def test_first_pass_error_stays_within_the_margin(vec_db):
    path, rng, centres = vec_db
    con = open_db(path, read_only=True)
    try:
        index = open_index(con, EMBEDDER)
        assert index is not None and len(index) == N
        exact = np.asarray(index.f32, np.float64)
        for c in range(5):
            qv = query_near(rng, centres, c)
            r = index.ranking(qv)
            assert np.abs(r.approx.double().numpy() - exact @ qv.astype(np.float64)).max() <= r.margin
            assert r.margin < 0.01  # tight enough that the rescoring reads few rows
    finally:
        con.close()


def test_index_follows_added_and_removed_labels(vec_db):
    path, rng, centres = vec_db
    con = open_db(path, read_only=True)
    qv = query_near(rng, centres, 5)
    first = rank_hits(con, EMBEDDER, qv, k=5)
    stamp = json.loads((index_dir(path, EMBEDDER) / "meta.json").read_text())["fingerprint"]
    con.close()

    con = open_db(path)
    new = add_labels(con, rng, N, N + 1, np.tile(100 * qv, (CLUSTERS, 1)))  # the query, nearly
    con.execute("DELETE FROM scores WHERE explanation_id = ?", [first[1].explanation_id])
    con.execute("DELETE FROM explanations WHERE explanation_id = ?", [first[1].explanation_id])
    con.execute("DELETE FROM label_embeddings WHERE explanation_id = ?", [first[1].explanation_id])
    con.close()

    con = open_db(path, read_only=True)
    try:
        hits = rank_hits(con, EMBEDDER, qv, k=5)
        assert hits[0].explanation_id == f"e{N}" and hits[0].similarity == pytest.approx(float(new[0] @ qv), abs=1e-6)
        assert first[1].explanation_id not in {h.explanation_id for h in hits}
        assert [h.explanation_id for h in hits] == exact_top(con, qv, 5, None)
    finally:
        con.close()
    assert json.loads((index_dir(path, EMBEDDER) / "meta.json").read_text())["fingerprint"] != stamp


def test_an_unwritable_index_folder_falls_back_to_sql(vec_db):
    path, rng, centres = vec_db
    with open(path + ".vectors", "w") as f:  # a file where the folder would go: mkdir fails
        f.write("not a folder")
    con = open_db(path, read_only=True)
    try:
        assert open_index(con, EMBEDDER) is None
        qv = query_near(rng, centres, 6)
        assert [h.explanation_id for h in rank_hits(con, EMBEDDER, qv, k=3)] == [
            h.explanation_id for h in rank_hits(con, EMBEDDER, qv, k=3, use_index=False)]
    finally:
        con.close()


def test_embed_writes_the_index_and_small_databases_get_none(vec_db, capsys, monkeypatch):
    path, _, _ = vec_db
    assert main(["embed", "--db", path]) == 0
    out = capsys.readouterr().out
    assert f"vector index: {N} vectors in {index_dir(path, EMBEDDER)}" in out
    monkeypatch.setenv("FEATURESCRIBE_VECTOR_INDEX_MIN_ROWS", str(N + 1))
    con = open_db(path, read_only=True)
    try:
        assert open_index(con, EMBEDDER) is None
    finally:
        con.close()
    monkeypatch.setenv("FEATURESCRIBE_VECTOR_INDEX_MIN_ROWS", "many")
    assert main(["search", "x", "--db", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FEATURESCRIBE_VECTOR_INDEX_MIN_ROWS must be a whole number" in err


def test_browser_searches_with_the_index_and_leaves_the_database_alone(vec_db):
    import hashlib
    import urllib.parse
    import urllib.request
    from pathlib import Path

    from featurescribe.llm.embeddings import embed_sync, make_embedder
    from featurescribe.web.server import serve_in_thread

    path, _, _ = vec_db
    before = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    running = serve_in_thread(path)
    try:
        url = running.url + "/api/features?mode=semantic&limit=7&q=" + urllib.parse.quote("closing brackets")
        with urllib.request.urlopen(url, timeout=120) as r:
            rows = json.load(r)["rows"]
        with urllib.request.urlopen(f"{running.url}/api/feature/6-mlp/0/neighbours", timeout=120) as r:
            neighbours = json.load(r)["neighbours"]
    finally:
        running.stop()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == before
    assert (index_dir(path, EMBEDDER) / "meta.json").is_file()
    qv = embed_sync(make_embedder(EMBEDDER), ["closing brackets"])[0]
    con = open_db(path, read_only=True)
    try:
        assert [(r["source_id"], r["feature_id"]) for r in rows] == [
            (h.source_id, h.feature_id) for h in rank_hits(con, EMBEDDER, qv, k=7, use_index=False)]
    finally:
        con.close()
    assert len(neighbours) == 6 and all(n["feature_id"] % CLUSTERS == 0 for n in neighbours)
