"""Label embeddings and semantic search: the offline MiniLM, `embed`, `search`, the hosted
embedder through the real openai SDK against tests/fake_llm.py, and labels embedded as they land."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from featurescribe.cli import build_parser, main
from featurescribe.flows.label_run import run_label
from featurescribe.flows.label_options import from_args
from featurescribe.llm.embeddings import embed_sync, make_embedder
from featurescribe.store import open_db
from featurescribe.store.connection import Database
from tests.dbq import q
from tests.export_fixtures import build_demo_db
from tests.fake_llm import fake_embedding

MINILM = "local:all-minilm-l6-v2"


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sem") / "demo.duckdb")
    build_demo_db(path)
    return path


@pytest.fixture
def db(demo_db, tmp_path):
    path = str(tmp_path / "copy.duckdb")
    shutil.copy(demo_db, path)
    return path



def n_embeddable(db) -> int:
    return q(db, "SELECT count(*) FROM explanations WHERE coalesce(status, 'ok') = 'ok' AND trim(text) <> ''")[0][0]


def test_minilm_vectors_are_unit_length_and_put_like_meanings_together():
    emb = make_embedder(MINILM)
    v = embed_sync(emb, ["digits in numbers and years", "numbers written with digits",
                         "text inside round brackets", ""])
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3
    # deterministic, and the same in a batch as alone
    assert np.allclose(embed_sync(emb, ["numbers written with digits"])[0], v[1], atol=1e-5)


def test_embed_then_search(db, capsys):
    assert main(["embed", "--db", db]) == 0
    out = capsys.readouterr().out
    n = n_embeddable(db)
    assert f"embedded {n} explanation(s) with {MINILM} (384 dimensions)" in out
    assert q(db, "SELECT count(*), count(DISTINCT explanation_id), min(dim), max(dim), min(len(vec)) "
                 "FROM label_embeddings")[0] == (n, n, 384, 384, 384)
    # resumable: nothing left to do
    assert main(["embed", "--db", db]) == 0
    assert f"embedded 0 explanation(s) with {MINILM}; {n} already had one" in capsys.readouterr().out

    assert main(["search", "numbers and years", "--db", db, "-k", "4", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4
    assert "digits" in hits[0]["explanation"]
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    labels = {(s, f): (e, sc, lift) for s, f, e, sc, lift in q(
        db, "SELECT source_id, feature_id, explanation, score, lift FROM labels")}
    density = dict(((s, f), d) for s, f, d in q(db, "SELECT source_id, feature_id, frac_active FROM features"))
    for h in hits:  # each hit is its feature's best label, with its score, lift and density
        key = (h["source_id"], h["feature_id"])
        assert (h["explanation"], h["score"], h["lift"]) == labels[key]
        assert h["density"] == density[key]

    assert main(["search", "numbers", "--db", db, "--source", "6-res-sae16", "-k", "50", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "source_id,feature_id,similarity,explanation,score,lift,density"
    n_labelled = q(db, "SELECT count(*) FROM labels WHERE source_id = '6-res-sae16'")[0][0]
    assert len(rows) - 1 == n_labelled and all(r.startswith("6-res-sae16,") for r in rows[1:])

    assert main(["search", "numbers", "--db", db, "--min-score", "0.99", "-k", "50", "--format", "json"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert good and all(h["score"] >= 0.99 for h in good)
    assert len(good) == q(db, "SELECT count(*) FROM labels WHERE score >= 0.99")[0][0]


def test_search_sql_documented_in_the_store_module_works(db):
    assert main(["embed", "--db", db]) == 0
    qvec = embed_sync(make_embedder(MINILM), ["closing brackets"])[0]
    con = open_db(db, read_only=True)
    try:
        rows = con.execute("""
            SELECT l.source_id, l.feature_id, l.explanation, list_inner_product(x.vec, $query::FLOAT[]) AS similarity
            FROM label_embeddings x JOIN labels l USING (explanation_id)
            WHERE x.embedder = 'local:all-minilm-l6-v2'
            ORDER BY similarity DESC LIMIT 3""", {"query": [float(v) for v in qvec]}).fetchall()
    finally:
        con.close()
    assert "bracket" in rows[0][2]


def test_search_without_embeddings_says_how_to_make_them(db, capsys):
    assert main(["search", "numbers", "--db", db]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no label embeddings" in err and f"featurescribe embed --db {db}" in err


@pytest.mark.parametrize("args, msg", [
    (["search", "  ", "--db", "{db}"], "query is empty"),
    (["search", "x", "--db", "{db}", "-k", "0"], "-k must be at least 1"),
    (["embed", "--db", "{db}", "--embedder", "cohere:embed"], "unknown embedder"),
    (["search", "x", "--db", "{db}", "--embedder", "openai:text-embedding-3-small"], "no embeddings by openai"),
    (["search", "x", "--db", "{db}", "--source", "9-nope"], "no source '9-nope' (sources in this database:"),
])
def test_bad_input_is_one_line_exit_2(db, capsys, args, msg):
    assert main(["embed", "--db", db]) == 0
    capsys.readouterr()
    assert main([a.format(db=db) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and msg in err


def test_openai_embedder_goes_through_the_llm_layer(db, fake_llm, capsys):
    spec = "openai:text-embedding-3-small"
    fake_llm.inject("500")  # retried like any call
    assert main(["embed", "--db", db, "--embedder", spec, "--batch-size", "16"]) == 0
    n = n_embeddable(db)
    assert f"embedded {n} explanation(s) with {spec} (64 dimensions)" in capsys.readouterr().out
    reqs = [r for r in fake_llm.requests if r.api == "embeddings"]
    assert reqs and all(r.model == "text-embedding-3-small" for r in reqs)
    assert [r.status for r in reqs].count(500) == 1
    # identical texts are sent once per batch; every explanation still gets its vector
    sent = sum(len(r.messages) for r in reqs if r.status == 200)
    assert sent < n
    calls = q(db, "SELECT status, purpose, input_tokens, cost_usd, model FROM llm_calls ORDER BY status")
    ok = [c for c in calls if c[0] == "ok"]
    assert {c[1] for c in calls} == {"embed"} and [c[0] for c in calls].count("error") == 1
    tokens = sum(r.input_tokens for r in reqs if r.status == 200)
    assert sum(c[2] for c in ok) == tokens
    assert sum(c[3] for c in ok) == pytest.approx(tokens * 0.02 / 1e6)
    # vectors are the server's, normalized
    eid, text = q(db, "SELECT explanation_id, text FROM explanations WHERE status = 'ok' LIMIT 1")[0]
    vec = np.asarray(q(db, "SELECT vec FROM label_embeddings WHERE explanation_id = ? AND embedder = ?",
                       [eid, spec])[0][0])
    want = np.asarray(fake_embedding(text), dtype=np.float32)
    assert np.allclose(vec, want / np.linalg.norm(want), atol=1e-6)

    # the cache answers a second embedding of the same texts: no new request, ledger rows 'cached'
    con = open_db(db)
    con.execute("DELETE FROM label_embeddings")
    con.close()
    before = len(fake_llm.requests)
    assert main(["embed", "--db", db, "--embedder", spec, "--batch-size", "16"]) == 0
    assert len(fake_llm.requests) == before
    capsys.readouterr()
    assert q(db, "SELECT count(*) FROM llm_calls WHERE status = 'cached'")[0][0] == len(ok)

    # search embeds the query with the same model (the db has only openai vectors now)
    assert main(["search", "digits numbers", "--db", db, "-k", "1", "--format", "json"]) == 0
    assert "digits" in json.loads(capsys.readouterr().out)[0]["explanation"]


def test_labels_are_embedded_as_they_land(db_path):
    from tests.test_sampling import SOURCE, build_db

    con = open_db(db_path)
    build_db(con, n_features=6)
    con.close()
    args = build_parser().parse_args(["label", "--db", db_path, "--source", SOURCE, "--no-progress"])
    run_label(args.db, from_args(args), progress=False)
    ok = q(db_path, "SELECT explanation_id FROM explanations WHERE status = 'ok' AND text <> ''")
    assert ok
    got = q(db_path, "SELECT explanation_id FROM label_embeddings WHERE embedder = ?", [MINILM])
    assert sorted(got) == sorted(ok)


def test_a_chunk_embeds_only_its_features_labels(db):
    from featurescribe.semantic.embed import embed_new_labels

    source = q(db, "SELECT source_id FROM explanations GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")[0][0]
    features = [f for (f,) in q(db, "SELECT DISTINCT feature_id FROM explanations WHERE status = 'ok' "
                                    "AND trim(text) <> '' AND source_id = ? ORDER BY 1", [source])]
    assert len(features) >= 4
    lo, hi = features[1], features[2]
    embed_new_labels(Database(db), source, (lo, hi))
    got = {f for (f,) in q(db, "SELECT feature_id FROM label_embeddings WHERE embedder = ?", [MINILM])}
    assert got == {lo, hi}
    embed_new_labels(Database(db), source)  # no range: every label of the source still missing
    assert q(db, "SELECT count(*) FROM label_embeddings WHERE embedder = ? AND source_id = ?", [MINILM, source])[0][0] \
        == q(db, "SELECT count(*) FROM explanations WHERE status = 'ok' AND trim(text) <> '' AND source_id = ?",
             [source])[0][0]


def test_hosted_embedder_failure_is_one_line_and_keeps_earlier_batches(db, fake_llm, capsys):
    spec = "openai:text-embedding-3-small"
    assert main(["embed", "--db", db, "--embedder", spec]) == 0
    capsys.readouterr()
    n = n_embeddable(db)
    con = open_db(db)
    con.execute("DELETE FROM label_embeddings WHERE explanation_id IN "
                "(SELECT explanation_id FROM label_embeddings ORDER BY explanation_id LIMIT 3)")
    con.close()
    fake_llm.inject("400")  # a request error is not retried; these three texts were never asked alone
    assert main(["embed", "--db", db, "--embedder", spec]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
    assert err.startswith("featurescribe: error: embedding failed:") and "HTTP 400" in err
    assert q(db, "SELECT count(*) FROM label_embeddings")[0][0] == n - 3
    assert main(["embed", "--db", db, "--embedder", spec]) == 0  # and a later run finishes
    assert q(db, "SELECT count(*) FROM label_embeddings")[0][0] == n


@pytest.mark.parametrize("refuse, rc, words", [  # both are the user's to fix: exit 2, no "run again"
    (lambda s: setattr(s, "api_key", "the-right-key"), 2, "refused the API key (HTTP 401"),
    (lambda s: setattr(s, "models", {"text-embedding-3-large"}), 2, "HTTP 404: The model `text-embedding-3-small` "
     "does not exist or you do not have access to it; check the model name in --embedder"),
])
def test_a_wrong_key_or_unknown_embedding_model_is_one_line_and_writes_nothing(db, fake_llm, capsys,
                                                                               refuse, rc, words):
    refuse(fake_llm)
    assert main(["embed", "--db", db, "--embedder", "openai:text-embedding-3-small"]) == rc
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("featurescribe: error: ") and words in err, err
    assert len([r for r in fake_llm.requests if r.api == "embeddings"]) == 1  # not retried
    assert q(db, "SELECT count(*) FROM label_embeddings")[0][0] == 0


def test_embed_leaves_the_file_free_while_the_embedder_works(db, fake_llm):
    import os
    import subprocess
    import sys
    import time

    spec = "openai:text-embedding-3-small"
    fake_llm.inject("slow", delay_s=8)  # the first batch's answer
    embed = subprocess.Popen([sys.executable, "-m", "featurescribe", "embed", "--db", db, "--embedder", spec,
                              "--batch-size", "16"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while fake_llm.in_flight == 0 and time.monotonic() < deadline and embed.poll() is None:
            time.sleep(0.02)
        assert fake_llm.in_flight >= 1, embed.communicate()[1] if embed.poll() is not None else "no request yet"
        con = open_db(db)  # another process writes meanwhile (it would wait 5 s, then fail, on a held file)
        con.execute("CREATE TABLE beside (x INTEGER)")
        con.close()
        assert embed.poll() is None  # still waiting for its first answer
        out, err = embed.communicate(timeout=120)
    finally:
        embed.kill()
    assert embed.returncode == 0, err
    assert q(db, "SELECT count(*) FROM label_embeddings")[0][0] == n_embeddable(db)


def test_a_vector_written_meanwhile_is_not_written_again(db):
    from featurescribe.store import embeddings as emb_sql

    con = open_db(db)
    try:
        todo = emb_sql.pending_texts(emb_sql.missing_texts(con, "local:test"))[:3]
        vecs = np.eye(3, 4, dtype=np.float32)
        assert emb_sql.write_embeddings(con, "local:test", todo[:2], vecs[:2]) == 2  # say, by a label run's chunk
        assert emb_sql.write_embeddings(con, "local:test", todo, vecs) == 1  # the embed run's batch: only the third
        rows = con.execute("SELECT explanation_id, vec FROM label_embeddings WHERE embedder = 'local:test' "
                           "ORDER BY explanation_id").fetchall()
    finally:
        con.close()
    assert sorted(r[0] for r in rows) == sorted(t.explanation_id for t in todo)
    assert {r[0]: r[1] for r in rows}[todo[2].explanation_id] == [0.0, 0.0, 1.0, 0.0]
