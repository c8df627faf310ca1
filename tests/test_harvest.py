"""The harvest on the real offline SmolLM2-135M: stored activations equal a direct transformers
computation of the same site, SAE latents equal torch's, stats are exact, reruns add nothing, an
interrupted harvest completes, and bad inputs write nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from featurescribe.cli import main
from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.harvester import HarvestConfig, harvest
from featurescribe.store import open_db
from tests.test_harvest_sae import expected_latents, write_sae

pytestmark = pytest.mark.slow

CTX = 16
LAYER = 3
TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "Numbers like 12, 345 and 6789 appear in tables; the list [1, 2, 3] has three items.\n"
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    "It was the best of times, it was the worst of times, it was the age of wisdom.\n"
) * 3


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return str(p)


def run(db, smollm2, corpus, **kw):
    cfg = HarvestConfig(db=db, model="smollm2-135m", layer=kw.pop("layer", LAYER), corpus=corpus, ctx=CTX,
                        max_tokens=kw.pop("max_tokens", 4 * CTX), batch_size=kw.pop("batch_size", 3),
                        progress=False, **kw)
    return harvest(cfg, loaded=smollm2)


def read(db, source_id):
    con = open_db(db, read_only=True)
    try:
        acts = con.execute("SELECT seq_id, pos, feature_id, act FROM activations WHERE source_id = ? "
                           "ORDER BY seq_id, pos, feature_id", [source_id]).fetchnumpy()
        seqs = con.execute("SELECT seq_id, token_ids, tokens FROM sequences ORDER BY seq_id").fetchall()
        feats = con.execute("SELECT feature_id, n_active, frac_active, max_act, mean_act FROM features "
                            "WHERE source_id = ? ORDER BY feature_id", [source_id]).fetchall()
        src = con.execute("SELECT * FROM sources WHERE source_id = ?", [source_id]).fetchone()
        cols = [d[0] for d in con.description]
    finally:
        con.close()
    return acts, seqs, feats, dict(zip(cols, src)) if src else None


def read_by_corpus_index(db, source_id):
    """`read`, with each sequence named by its place in the corpus instead of its seq_id: a re-run
    gives the sequences it harvests the next free seq_ids, so after a partial first run the ids
    can differ from a clean run's while the rows are the same."""
    con = open_db(db, read_only=True)
    try:
        acts = con.execute("SELECT s.corpus_index, a.pos, a.feature_id, a.act FROM activations a JOIN sequences s "
                           "USING (seq_id) WHERE a.source_id = ? ORDER BY 1, 2, 3", [source_id]).fetchall()
        seqs = con.execute("SELECT corpus_index, token_ids, tokens FROM sequences ORDER BY 1").fetchall()
    finally:
        con.close()
    return acts, seqs


def direct(model, site, layer, token_ids):
    """The site's activations [T, width] for one sequence, computed independently of the harvest."""
    ids = torch.tensor([token_ids])
    block = model.model.layers[layer]
    box = {}
    with torch.no_grad():
        if site == "resid":
            return model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
        if site == "mlp":
            h = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: box.setdefault("x", a[0]))
        else:
            h = block.self_attn.o_proj.register_forward_hook(lambda m, a, o: box.setdefault("x", o))
        try:
            model(ids)
        finally:
            h.remove()
    return box["x"][0]


def assert_matches(stored, seqs, dense_of, threshold, tol=2e-4):
    """Stored entries = the dense activations above the threshold (positions >= 1), values equal."""
    got = {(int(s), int(p), int(f)): float(a) for s, p, f, a in
           zip(stored["seq_id"], stored["pos"], stored["feature_id"], stored["act"])}
    n_checked = 0
    for seq_id, token_ids, _ in seqs:
        dense = dense_of(token_ids).float().numpy()
        for (p, f) in zip(*np.nonzero(dense > threshold + tol)):
            if p == 0:
                continue
            assert (seq_id, p, f) in got, f"missing entry seq {seq_id} pos {p} feature {f}"
        for (s, p, f), a in got.items():
            if s == seq_id:
                assert p >= 1
                assert abs(dense[p, f] - a) <= tol * max(1.0, abs(a)), (s, p, f, dense[p, f], a)
                assert dense[p, f] > threshold - tol
                n_checked += 1
    return n_checked


@pytest.mark.parametrize("site", ["mlp", "resid", "attn"])
def test_stored_activations_equal_direct_computation(smollm2, db_path, corpus_file, site):
    _, model, _ = smollm2
    thr = {"mlp": 0.2, "resid": 1.0, "attn": 0.3}[site]
    r = run(db_path, smollm2, corpus_file, site=site, threshold=thr)
    assert r.source_id == f"{LAYER}-{ {'mlp': 'mlp', 'resid': 'res', 'attn': 'att'}[site] }"
    acts, seqs, feats, src = read(db_path, r.source_id)
    assert len(seqs) == 4 and all(len(t) == CTX for _, t, _ in seqs)
    n = assert_matches(acts, seqs, lambda ids: direct(model, site, LAYER, ids), thr)
    assert n == len(acts["act"]) > 0
    assert src["width"] == (1536 if site == "mlp" else 576)
    assert src["kind"] == "neuron" and src["layer"] == LAYER and src["model_id"] == "smollm2-135m"
    assert src["hook_name"] == {"mlp": f"model.layers.{LAYER}.mlp.down_proj.input",
                                "resid": f"model.layers.{LAYER}.output",
                                "attn": f"model.layers.{LAYER}.self_attn.o_proj.output"}[site]


def test_stats_tokens_and_sequences(smollm2, db_path, corpus_file):
    _, _, tok = smollm2
    r = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2)
    acts, seqs, feats, src = read(db_path, r.source_id)
    n_tokens = sum(len(t) - 1 for _, t, _ in seqs)
    assert src["n_tokens"] == r.n_tokens == n_tokens
    assert len(feats) == 1536  # every feature has a row, dead ones too
    f_ids = acts["feature_id"]
    for fid, n_active, frac, mx, mean in feats:
        sel = acts["act"][f_ids == fid]
        assert n_active == len(sel)
        assert frac == pytest.approx(len(sel) / n_tokens)
        if len(sel):
            assert mx == pytest.approx(sel.max()) and mean == pytest.approx(sel.mean(), rel=1e-5)
        else:
            assert mx is None and mean is None
    # tokens: each token's own text (' def' keeps its space); together they spell the text
    for _, token_ids, tokens in seqs:
        assert len(tokens) == len(token_ids)
        assert "".join(tokens) == tok.decode(token_ids)
    assert any(t.startswith(" ") for _, _, ts in seqs for t in ts)


def test_auto_threshold_keeps_about_one_percent(smollm2, db_path, corpus_file):
    r = run(db_path, smollm2, corpus_file, site="mlp")
    assert r.threshold > 0
    density = r.n_activations / (r.n_tokens * r.width)
    assert 0.002 < density < 0.05


@pytest.mark.parametrize("arch, style", [("standard", "v6"), ("topk", "flat"), ("jumprelu", "v6"),
                                         ("standard", "flat")])
def test_sae_latents_equal_torch(smollm2, db_path, corpus_file, tmp_path, arch, style):
    _, model, _ = smollm2
    hook = f"blocks.{LAYER}.hook_resid_post" if style == "v6" else f"model.layers.{LAYER}.output"
    w = write_sae(tmp_path / "sae", arch, 576, 96, style=style, hook_name=hook, k=6, scale=0.3)
    r = run(db_path, smollm2, corpus_file, sae=str(tmp_path / "sae"))
    assert r.source_id == f"{LAYER}-res-sae96" and r.kind == "sae" and r.width == 96 and r.threshold == 0
    acts, seqs, feats, src = read(db_path, r.source_id)
    assert src["kind"] == "sae" and src["width"] == 96 and src["site"] == "resid"
    n = assert_matches(acts, seqs, lambda ids: expected_latents(w, arch, direct(model, "resid", LAYER, ids), k=6),
                       0.0, tol=2e-4)
    assert n > 0
    if arch == "topk":
        per_token = {}
        for s, p in zip(acts["seq_id"], acts["pos"]):
            per_token[(s, p)] = per_token.get((s, p), 0) + 1
        assert max(per_token.values()) <= 6


def test_sae_width_label(smollm2, db_path, corpus_file, tmp_path):
    write_sae(tmp_path / "sae", "topk", 576, 4096, hook_name=f"blocks.{LAYER}.hook_resid_post", k=4)
    r = run(db_path, smollm2, corpus_file, sae=str(tmp_path / "sae"), max_tokens=CTX)
    assert r.source_id == f"{LAYER}-res-sae4k"


def test_rerun_adds_nothing_and_second_source_reuses_sequences(smollm2, db_path, corpus_file):
    r1 = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2)
    before = read(db_path, r1.source_id)
    r2 = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2)
    after = read(db_path, r1.source_id)
    assert r2.new_sequences == 0
    assert len(after[0]["act"]) == len(before[0]["act"]) == r1.n_activations
    assert after[1] == before[1] and after[2] == before[2]
    r3 = run(db_path, smollm2, corpus_file, site="resid", threshold=1.0)
    acts3, seqs3, _, _ = read(db_path, r3.source_id)
    assert seqs3 == before[1]  # same tokenizer, corpus and ctx: the same sequences, not new ones
    assert set(acts3["seq_id"].tolist()) <= {s for s, _, _ in seqs3}


def test_interrupted_harvest_completes_to_the_same_result(smollm2, tmp_path, corpus_file, monkeypatch):
    from featurescribe.harvest import corpus as corpus_mod

    fresh = str(tmp_path / "fresh.duckdb")
    run(fresh, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    want = read(fresh, f"{LAYER}-mlp")

    real = corpus_mod.sequences

    def dies_after_two(*a, **kw):
        for i, s in enumerate(real(*a, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield s

    broken = str(tmp_path / "broken.duckdb")
    monkeypatch.setattr(corpus_mod, "sequences", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(broken, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    monkeypatch.setattr(corpus_mod, "sequences", real)
    con = open_db(broken, read_only=True)
    assert con.execute("SELECT count(*) FROM harvest_progress").fetchone()[0] == 2
    con.close()
    r = run(broken, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    assert r.new_sequences == 2
    got = read(broken, f"{LAYER}-mlp")
    assert got[1] == want[1] and got[2] == want[2]
    np.testing.assert_array_equal(got[0]["act"], want[0]["act"])


def spread_over_writers(monkeypatch, fail_at=None) -> list:
    """Staging.add held until both writer threads have taken a batch, so that each holds some of
    them whatever the machine's load; the batch of corpus index `fail_at` fails in its writer (as a
    full disk would). -> the (thread, index) staged, and ("failed", thread) for the writer that failed."""
    import threading

    from featurescribe.harvest.staging import Staging

    staged, real = [], Staging.add
    seen, lock, both = set(), threading.Lock(), threading.Barrier(2, timeout=60)

    def add(self, item):
        name = threading.current_thread().name
        with lock:
            first = name not in seen
            seen.add(name)
        if first:
            both.wait()  # the writer with the first batch waits for the other to take the second
        index = int(item.batch.corpus_index[0])
        if index == fail_at:
            staged.append(("failed", name))
            raise OSError("No space left on device")
        real(self, item)
        staged.append((name, index))

    monkeypatch.setattr(Staging, "add", add)
    return staged


def test_the_writers_last_buffers_go_in_one_commit(smollm2, db_path, corpus_file, monkeypatch):
    from featurescribe.store import harvest_rows

    commits, real = [], harvest_rows.write_harvest_rows

    def counted(con, sequences, activations, progress, *a, **kw):
        commits.append(progress.num_rows)
        return real(con, sequences, activations, progress, *a, **kw)

    monkeypatch.setattr(harvest_rows, "write_harvest_rows", counted)
    staged = spread_over_writers(monkeypatch)
    r = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    assert len({thread for thread, _ in staged}) == 2  # both writers held batches at the end
    assert commits == [r.new_sequences] == [4]  # one transaction, every batch's progress row in it


def test_a_writer_error_keeps_what_the_other_writer_held(smollm2, tmp_path, corpus_file, monkeypatch):
    fresh = str(tmp_path / "fresh.duckdb")
    run(fresh, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    want = read(fresh, f"{LAYER}-mlp")

    broken = str(tmp_path / "broken.duckdb")
    with monkeypatch.context() as m:
        staged = spread_over_writers(m, fail_at=1)
        with pytest.raises(OSError, match="No space left"):
            run(broken, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    failed = [name for what, name in staged if what == "failed"]
    # what the failing writer had staged before its error is dropped with it (a re-run harvests it)
    kept = sorted(index for thread, index in staged if thread != "failed" and thread not in failed)
    assert len(failed) == 1 and 0 in kept and 1 not in kept  # the barrier put batches 0 and 1 in different writers
    con = open_db(broken, read_only=True)
    done = [r[0] for r in con.execute("SELECT s.corpus_index FROM harvest_progress p JOIN sequences s "
                                      "USING (seq_id) ORDER BY 1").fetchall()]
    con.close()
    assert done == kept  # what the writer that did not fail held was committed
    r = run(broken, smollm2, corpus_file, site="mlp", threshold=0.2, batch_size=1)
    assert r.new_sequences == 4 - len(kept)
    assert read(broken, f"{LAYER}-mlp")[2] == want[2]  # every feature's statistics
    assert read_by_corpus_index(broken, f"{LAYER}-mlp") == read_by_corpus_index(fresh, f"{LAYER}-mlp")


def test_more_tokens_extends_the_source(smollm2, db_path, corpus_file):
    run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, max_tokens=2 * CTX)
    r = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, max_tokens=4 * CTX)
    assert r.new_sequences == 2 and r.n_sequences == 4
    assert r.n_tokens == 4 * (CTX - 1)


def test_conflicting_source_is_refused_and_overwrite_replaces(smollm2, db_path, corpus_file):
    run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2)
    with pytest.raises(FeaturescribeError, match="already exists with threshold"):
        run(db_path, smollm2, corpus_file, site="mlp", threshold=0.5)
    r = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.5, overwrite=True)
    acts, _, _, src = read(db_path, r.source_id)
    assert src["threshold"] == 0.5 and acts["act"].min() > 0.5
    r2 = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, source_id="low")
    assert r2.source_id == "low" and r2.n_activations > r.n_activations


def _corpus_of_each_sequence(db) -> dict[int, str]:
    con = open_db(db, read_only=True)
    try:
        return dict(con.execute("SELECT seq_id, corpus FROM sequences").fetchall())
    finally:
        con.close()


def test_overwrite_with_another_corpus_removes_only_the_sequences_nothing_else_uses(
        smollm2, db_path, corpus_file, tmp_path):
    """--overwrite left the old corpus's sequences in `sequences`, where the sampler draws random
    windows from (windows the new source never saw, read as silent)."""
    run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2)  # 4 sequences of the first corpus
    other = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, layer=2, max_tokens=2 * CTX)
    old = _corpus_of_each_sequence(db_path)
    other_before = read(db_path, other.source_id)
    con = open_db(db_path)
    kept_for_a_label = con.execute(  # a window an earlier label run stored, of a sequence only 3-mlp used
        "SELECT max(seq_id) FROM harvest_progress WHERE source_id = ?", [f"{LAYER}-mlp"]).fetchone()[0]
    con.execute("INSERT INTO examples (source_id, feature_id, seq_id, start_pos, end_pos, split, kind) "
                "VALUES (?, 0, ?, 0, 4, 'explain', 'top')",
                [f"{LAYER}-mlp", kept_for_a_label])
    con.close()
    second = tmp_path / "second.txt"
    second.write_text("An entirely different corpus, about rivers, mountains and the weather. " * 20)
    r = run(db_path, smollm2, str(second), site="mlp", threshold=0.2, overwrite=True)
    now = _corpus_of_each_sequence(db_path)
    new_ids = {s for s, c in now.items() if s not in old}
    assert len(new_ids) == r.n_sequences == 4
    con = open_db(db_path, read_only=True)
    other_ids = {r[0] for r in con.execute("SELECT seq_id FROM harvest_progress WHERE source_id = ?",
                                           [other.source_id]).fetchall()}
    con.close()
    assert len(other_ids) == 2
    assert set(now) - new_ids == other_ids | {kept_for_a_label}  # the other source's and the label's
    assert all(now[s] == old[s] for s in set(now) - new_ids)
    other_after = read(db_path, other.source_id)
    assert other_after[2] == other_before[2] and (other_after[0]["act"] == other_before[0]["act"]).all()
    acts, *_ = read(db_path, r.source_id)
    assert set(int(s) for s in acts["seq_id"]) <= new_ids


def test_cli_prints_source_id_last(smollm2, db_path, corpus_file, capsys):
    rc = main(["harvest", "--db", db_path, "--model", "smollm2-135m", "--layer", "2", "--corpus", corpus_file,
               "--ctx", str(CTX), "--max-tokens", str(2 * CTX), "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[-1] == "source_id: 2-mlp"
    con = open_db(db_path, read_only=True)
    row = con.execute("SELECT threshold, params FROM sources").fetchone()
    con.close()
    assert row[0] > 0 and json.loads(row[1])["status"] == "complete"


# --- bad inputs: a clear error and nothing written -----------------------------------------------

def cli_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("featurescribe: error: ") and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("make", ["empty_txt", "empty_dir", "jsonl_without_text"])
def test_empty_corpus(smollm2, db_path, tmp_path, capsys, make):
    if make == "empty_txt":
        spec = tmp_path / "empty.txt"
        spec.write_text("")
    elif make == "empty_dir":
        spec = tmp_path / "nothing"
        spec.mkdir()
    else:
        spec = tmp_path / "docs.jsonl"
        spec.write_text('{"title": "no text here"}\n{"text": ""}\n')
    err = cli_error(["harvest", "--db", db_path, "--model", "smollm2-135m", "--layer", "1", "--corpus", str(spec)],
                    capsys)
    assert "empty" in err
    assert not os.path.exists(db_path)


def test_unknown_model(db_path, corpus_file, capsys):
    err = cli_error(["harvest", "--db", db_path, "--model", "no-such-model", "--layer", "1", "--corpus", corpus_file],
                    capsys)
    assert "unknown model" in err
    assert not os.path.exists(db_path)


def test_layer_out_of_range(smollm2, db_path, corpus_file, capsys):
    err = cli_error(["harvest", "--db", db_path, "--model", "smollm2-135m", "--layer", "30", "--corpus", corpus_file],
                    capsys)
    assert "out of range" in err and "30 layers" in err
    assert not os.path.exists(db_path)


def test_sae_width_mismatch(smollm2, db_path, corpus_file, tmp_path, capsys):
    write_sae(tmp_path / "sae", "standard", 100, 64, hook_name=None)
    err = cli_error(["harvest", "--db", db_path, "--model", "smollm2-135m", "--layer", "1", "--site", "resid",
                     "--sae", str(tmp_path / "sae"), "--corpus", corpus_file], capsys)
    assert "width mismatch" in err and "d_in=100" in err and "576" in err
    assert not os.path.exists(db_path)


def test_sae_for_another_layer_or_site(smollm2, db_path, corpus_file, tmp_path):
    write_sae(tmp_path / "sae", "standard", 576, 64, hook_name="blocks.5.hook_resid_post")
    with pytest.raises(FeaturescribeError, match="layer 5"):
        run(db_path, smollm2, corpus_file, sae=str(tmp_path / "sae"))
    with pytest.raises(FeaturescribeError, match="layer 5"):
        run(db_path, smollm2, corpus_file, sae=str(tmp_path / "sae"), layer="3,4")
    assert not os.path.exists(db_path)


def test_bad_site_and_options(smollm2, db_path, corpus_file):
    for kw, msg in [({"site": "mlp_hidden"}, "unknown site"), ({"threshold": "lots"}, "bad --threshold"),
                    ({"ctx": 1}, "--ctx"), ({"corpus": "builtin:nope"}, "unknown builtin corpus")]:
        with pytest.raises(FeaturescribeError, match=msg):
            cfg = dict(site="mlp", corpus=corpus_file)
            cfg.update(kw)
            harvest(HarvestConfig(db=db_path, model="smollm2-135m", layer=1, progress=False, **cfg), loaded=smollm2)
    assert not os.path.exists(db_path)


def test_token_strings_are_each_tokens_own_text_whatever_the_order_ids_arrive_in(smollm2):
    """The `tokens` column: one id at a time through the tokenizer's decoder (' def' keeps its
    space), ids decoded in one batch call, and ids past `len(tokenizer)` grow the table."""
    from featurescribe.harvest.writer import TokenStrings

    _, _, tok = smollm2
    decoder = tok.backend_tokenizer.decoder
    ids = np.array(tok("def add(a, b):\n    return a  +  b  # ü").input_ids, dtype=np.int32)
    ts = TokenStrings(tok)
    first = ts(ids[::-1].copy()).to_pylist()[::-1]
    assert first == [decoder.decode([tok.convert_ids_to_tokens(int(i))]) for i in ids]
    assert ts(ids).to_pylist() == first and " add" in first
    past = np.array([len(tok) + 2, ids[0]], dtype=np.int32)
    assert ts(past).to_pylist() == ["", first[0]]


def test_a_full_disk_is_one_line_and_a_rerun_finishes(smollm2, tmp_path, corpus_file, monkeypatch, capsys):
    import duckdb

    from featurescribe.store import harvest_rows

    fresh = str(tmp_path / "fresh.duckdb")
    run(fresh, smollm2, corpus_file, site="mlp", threshold=0.2)
    db = str(tmp_path / "full.duckdb")
    argv = ["harvest", "--db", db, "--model", "smollm2-135m", "--layer", str(LAYER), "--corpus", corpus_file,
            "--ctx", str(CTX), "--max-tokens", str(4 * CTX), "--batch-size", "3", "--threshold", "0.2",
            "--no-progress"]

    def full(*a, **kw):  # what DuckDB raises when the file cannot grow
        raise duckdb.IOException(f'IO Error: Could not write file "{db}": No space left on device')

    with monkeypatch.context() as m:
        m.setattr(harvest_rows, "write_harvest_rows", full)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurescribe: error: the disk is full (") and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "run the same command again" in err
    assert main(argv) == 0
    assert read_by_corpus_index(db, f"{LAYER}-mlp") == read_by_corpus_index(fresh, f"{LAYER}-mlp")
    assert read(db, f"{LAYER}-mlp")[2] == read(fresh, f"{LAYER}-mlp")[2]


def test_disk_full_reads_the_error_chain():
    import errno

    from featurescribe.errors import DiskFull, disk_full

    assert isinstance(disk_full(OSError(errno.ENOSPC, "No space left on device")), DiskFull)
    try:
        try:
            raise RuntimeError('Could not write file "x.wal": No space left on device')
        except RuntimeError:
            raise ValueError("the flow failed")  # noqa: B904 - a later error raised while handling it
    except ValueError as later:
        assert "x.wal" in str(disk_full(later))
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full(ValueError("no")) is None


def test_a_corpus_changed_since_is_refused_not_mixed_in(smollm2, db_path, corpus_file):
    """The same path with other contents gives other sequences: they used to be harvested into the
    source beside the old ones (a 64-token harvest grew to 128 tokens of two corpora)."""
    first = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, max_tokens=2 * CTX)
    before = read(db_path, f"{LAYER}-mlp")
    with open(corpus_file, "a") as f:
        f.write("A line added after the first harvest.\n")
    with pytest.raises(FeaturescribeError, match="already exists with other corpus contents"):
        run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, max_tokens=4 * CTX)
    after = read(db_path, f"{LAYER}-mlp")
    assert after[3]["n_tokens"] == first.n_tokens and after[2] == before[2]
    assert (after[0]["act"] == before[0]["act"]).all()
    r = run(db_path, smollm2, corpus_file, site="mlp", threshold=0.2, max_tokens=4 * CTX, overwrite=True)
    assert r.n_sequences == 4
