"""Sampling: top / quantile / random windows, disjoint splits, determinism, dead and rare features.

The databases are built directly with insert_arrow: synthetic sources, sequences, activations
and features, with features planted to fire on known tokens.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from featurescribe.records import SPLITS
from featurescribe.store import open_db
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.sampling import (
    SamplingConfig,
    interleave,
    load_examples,
    sample_examples,
)

SOURCE = "3-test"
VOCAB = [" the", " cat", " sat", " on", " mat", " def", " class", " return", "(", ")", ":",
         " 1", " 2", " 3", " and", " or", " if", " else", "\n", " a", " dog", " ran", ".", ","]
PLANTED = {" def": 5.0, " class": 3.0, " return": 2.0}  # feature 2 fires on these


def build_db(con, *, n_seqs: int = 120, seq_len: int = 48, n_features: int = 12, seed: int = 0,
             duplicate_seqs: int = 0) -> dict:
    """A small synthetic source. Feature 0 is dead, feature 1 rare (3 sequences), feature 2 fires
    on PLANTED tokens, features 3.. fire at random (5% of tokens). The last `duplicate_seqs`
    sequences copy sequence 0's tokens and feature 3's activations on it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(VOCAB), size=(n_seqs, seq_len))
    for k in range(duplicate_seqs):
        ids[n_seqs - 1 - k] = ids[0]
    insert_arrow(con, "sources", {"source_id": [SOURCE], "model_id": ["synthetic"], "hook_name": ["h"],
                                  "layer": [3], "kind": ["neuron"], "width": [n_features]})
    insert_arrow(con, "sequences", pa.table({
        "seq_id": pa.array(range(n_seqs), pa.int64()),
        "token_ids": pa.array([[int(t) for t in row] for row in ids], pa.list_(pa.int32())),
        "tokens": pa.array([[VOCAB[t] for t in row] for row in ids], pa.list_(pa.string())),
    }))
    acts: dict[tuple[int, int, int], float] = {}
    for s in (5, 40, 77):  # feature 1: three sequences only
        acts[(1, s, 10)] = 1.5
    for s in range(n_seqs):
        for p in range(seq_len):
            tok = VOCAB[ids[s, p]]
            if tok in PLANTED:
                acts[(2, s, p)] = PLANTED[tok] * float(rng.uniform(0.8, 1.0))
    for f in range(3, n_features):
        mask = rng.random((n_seqs, seq_len)) < 0.05
        for s, p in zip(*np.nonzero(mask)):
            acts[(f, int(s), int(p))] = float(rng.uniform(0.01, 10.0))
    for k in range(duplicate_seqs):  # copies of sequence 0 carry feature 3's activations too
        dup = n_seqs - 1 - k
        for key in [key for key in acts if key[0] == 3 and key[1] == dup]:
            del acts[key]
        for (f, s, p), a in list(acts.items()):
            if f == 3 and s == 0:
                acts[(3, dup, p)] = a
        acts[(3, 0, 0)] = acts[(3, dup, 0)] = 50.0  # sequence 0 and its copies are the top
    insert_acts(con, acts)
    con.execute(f"""
        INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act, status)
        SELECT '{SOURCE}', f::INTEGER, coalesce(n, 0), coalesce(n, 0) / {n_seqs * seq_len}, m, a,
               CASE WHEN n IS NULL THEN 'dead' ELSE 'alive' END
        FROM range({n_features}) t(f) LEFT JOIN (
            SELECT feature_id, count(*) n, max(act) m, avg(act) a FROM activations GROUP BY 1
        ) x ON x.feature_id = f""")
    return {"ids": ids, "acts": acts, "n_seqs": n_seqs, "seq_len": seq_len, "n_features": n_features}


def insert_acts(con, acts: dict[tuple[int, int, int], float]) -> None:
    """Rows of `activations` from {(feature, seq, pos): act}."""
    keys = sorted(acts)
    insert_arrow(con, "activations", pa.table({
        "source_id": pa.array([SOURCE] * len(keys), pa.string()),
        "feature_id": pa.array([k[0] for k in keys], pa.int32()),
        "seq_id": pa.array([k[1] for k in keys], pa.int64()),
        "pos": pa.array([k[2] for k in keys], pa.int32()),
        "act": pa.array([acts[k] for k in keys], pa.float32()),
    }))


@pytest.fixture
def db(con):
    info = build_db(con)
    return con, info


def _examples(con, feature_id=None):
    q = ("SELECT feature_id, seq_id, start_pos, end_pos, split, kind, rank, quantile, max_act "
         "FROM examples")
    if feature_id is not None:
        q += f" WHERE feature_id = {int(feature_id)}"
    cur = con.execute(q + " ORDER BY ALL")
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def test_interleave_deals_ranks_in_proportion():
    assert interleave([2, 1, 1]) == [0, 1, 2, 0]
    pat = interleave([20, 5, 10])
    assert [pat.count(i) for i in range(3)] == [20, 5, 10]
    assert pat[:3] == [0, 2, 0]  # the explainer gets rank 1, test gets a top-3 rank too
    assert interleave([0, 0, 3]) == [2, 2, 2]
    assert interleave([]) == []


def test_splits_disjoint_one_window_per_sequence(db):
    con, info = db
    report = sample_examples(con, SOURCE, range(info["n_features"]))
    assert report.sampled and report.n_windows > 0
    rows = _examples(con)
    by_feature = defaultdict(list)
    for r in rows:
        by_feature[r["feature_id"]].append(r)
    for f, rs in by_feature.items():
        seqs = [r["seq_id"] for r in rs]
        assert len(seqs) == len(set(seqs)), f"feature {f}: a sequence is used twice"
        per_split = {s: {r["seq_id"] for r in rs if r["split"] == s} for s in SPLITS}
        assert not per_split["explain"] & per_split["valid"]
        assert not per_split["explain"] & per_split["test"]
        assert not per_split["valid"] & per_split["test"]
        for r in rs:
            assert 0 <= r["start_pos"] < r["end_pos"] <= info["seq_len"]
            assert r["end_pos"] - r["start_pos"] == min(32, info["seq_len"])


def test_counts_per_split_and_kind(db):
    con, info = db
    cfg = SamplingConfig()
    sample_examples(con, SOURCE, [3], cfg)
    got = defaultdict(int)
    for r in _examples(con, 3):
        got[(r["split"], r["kind"])] += 1
    want = {(s, k): cfg.count(s, k) for s in SPLITS for k in ("top", "quantile", "random")
            if cfg.count(s, k)}
    assert dict(got) == want


def _brute_force_top(info, feature_id: int, k: int):
    """Per sequence: the maximum activation and its first position; the k highest sequences."""
    best: dict[int, tuple[float, int]] = {}
    for (f, s, p), a in info["acts"].items():
        if f != feature_id or a <= 0:
            continue
        a = float(np.float32(a))
        if s not in best or a > best[s][0] or (a == best[s][0] and p < best[s][1]):
            best[s] = (a, p)
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(s, a, p) for s, (a, p) in ranked]


@pytest.mark.parametrize("feature_id", [3, 4, 7])
def test_top_windows_equal_brute_force_top_k(db, feature_id):
    con, info = db
    cfg = SamplingConfig()
    sample_examples(con, SOURCE, [feature_id], cfg)
    n_top = cfg.total("top")
    want = _brute_force_top(info, feature_id, n_top)
    rows = sorted((r for r in _examples(con, feature_id) if r["kind"] == "top"), key=lambda r: r["rank"])
    assert [r["seq_id"] for r in rows] == [s for s, _, _ in want]
    assert [r["max_act"] for r in rows] == pytest.approx([a for _, a, _ in want])
    pattern = [SPLITS[i] for i in interleave([cfg.count(s, "top") for s in SPLITS])]
    assert [r["split"] for r in rows] == pattern
    for r, (s, a, peak) in zip(rows, want):
        start = max(0, min(peak - cfg.left, info["seq_len"] - cfg.window))
        assert r["start_pos"] == start
        assert r["start_pos"] <= peak < r["end_pos"]


def test_quantile_windows_are_other_active_sequences_in_every_bin(db):
    con, info = db
    cfg = SamplingConfig.with_counts({"explain": {"top": 5, "quantile": 8}, "test": {"random": 4}},
                                     n_quantiles=4, min_active=5)
    sample_examples(con, SOURCE, [5], cfg)
    rows = _examples(con, 5)
    top = {r["seq_id"] for r in rows if r["kind"] == "top"}
    q = [r for r in rows if r["kind"] == "quantile"]
    assert len(q) == 8
    assert sorted({r["quantile"] for r in q}) == [1, 2, 3, 4]
    assert not top & {r["seq_id"] for r in q}
    # every quantile window's sequence is active, and higher bins hold higher peaks
    peaks = {s: a for s, a, _ in _brute_force_top(info, 5, 10_000)}
    assert all(r["seq_id"] in peaks for r in q)
    lo = max(peaks[r["seq_id"]] for r in q if r["quantile"] == 1)
    hi = min(peaks[r["seq_id"]] for r in q if r["quantile"] == 4)
    assert lo < hi


def test_random_windows_may_be_silent_and_avoid_used_sequences(db):
    con, info = db
    sample_examples(con, SOURCE, [2, 3], SamplingConfig())
    for f in (2, 3):
        rows = _examples(con, f)
        rnd = [r for r in rows if r["kind"] == "random"]
        assert len(rnd) == 15
        assert {r["split"] for r in rnd} == {"valid", "test"}
        others = {r["seq_id"] for r in rows if r["kind"] != "random"}
        assert not others & {r["seq_id"] for r in rnd}
        for r in rnd:  # max_act is the window's own peak (0 where the feature is silent)
            want = max([a for (ff, s, p), a in info["acts"].items()
                        if ff == f and s == r["seq_id"] and r["start_pos"] <= p < r["end_pos"]],
                       default=0.0)
            assert r["max_act"] == pytest.approx(want)


def test_random_windows_come_only_from_the_sources_own_sequences(db):
    """Another corpus harvested into the same database (another source's sequences) never gives
    this source a random window: its activations there were never computed."""
    con, info = db
    n = len(info["ids"])
    insert_arrow(con, "harvest_progress", {"source_id": [SOURCE] * n, "seq_id": list(range(n))})
    insert_arrow(con, "harvest_progress", {"source_id": ["other"] * 400, "seq_id": list(range(n, n + 400))})
    insert_arrow(con, "sequences", pa.table({
        "seq_id": pa.array(range(n, n + 400), pa.int64()),
        "token_ids": pa.array([[1] * 48] * 400, pa.list_(pa.int32())),
        "tokens": pa.array([[VOCAB[1]] * 48] * 400, pa.list_(pa.string())),
    }))
    sample_examples(con, SOURCE, list(range(3, 12)), SamplingConfig())
    rnd = con.execute("SELECT seq_id FROM examples WHERE kind = 'random'").fetchall()
    assert len(rnd) == 9 * 15 and max(s for (s,) in rnd) < n


def test_deterministic_for_a_seed(tmp_path):
    def run(name, seed):
        c = open_db(str(tmp_path / name))
        build_db(c)
        sample_examples(c, SOURCE, range(12), SamplingConfig(seed=seed))
        rows = _examples(c)
        c.close()
        return rows

    a, b = run("a.duckdb", 7), run("b.duckdb", 7)
    assert a == b
    c = run("c.duckdb", 8)
    assert [r for r in a if r["kind"] == "random"] != [r for r in c if r["kind"] == "random"]


def test_a_features_examples_do_not_depend_on_its_batch(tmp_path):
    def run(name, batches):
        c = open_db(str(tmp_path / name))
        build_db(c)
        for b in batches:
            sample_examples(c, SOURCE, b)
        rows = _examples(c)
        c.close()
        return rows

    assert run("a.duckdb", [[3, 4, 5, 6]]) == run("b.duckdb", [[6], [3, 5], [4]])


def test_existing_examples_are_kept_unless_resampled(db):
    con, _ = db
    first = sample_examples(con, SOURCE, [3, 4])
    rows = _examples(con)
    again = sample_examples(con, SOURCE, [3, 4, 5])
    assert again.reused == [3, 4] and again.sampled == [5]
    assert [r for r in _examples(con) if r["feature_id"] in (3, 4)] == rows
    redo = sample_examples(con, SOURCE, [3], SamplingConfig(seed=1), resample=True)
    assert redo.sampled == [3]
    assert len(_examples(con, 3)) == len([r for r in rows if r["feature_id"] == 3])
    assert first.n_windows == len(rows)


def test_dead_and_rare_features_are_marked_and_skipped(db):
    con, _ = db
    report = sample_examples(con, SOURCE, [0, 1, 2, 3])
    assert report.dead == [0] and report.rare == [1]
    assert sorted(report.sampled) == [2, 3]
    status = dict(con.execute(
        "SELECT feature_id, status || ': ' || coalesce(skip_reason, '') FROM features "
        "WHERE feature_id < 4").fetchall())
    assert status[0].startswith("dead: no activations")
    assert status[1] == "rare: active in 3 sequences, fewer than the 10 needed"
    assert status[2] == "alive: " and status[3] == "alive: "
    assert not _examples(con, 0) and not _examples(con, 1)
    changed = report.status_changed
    assert changed >= 2  # dead and rare, whatever the harvest had written
    # again: nothing changes, so no row of `features` is updated (nor rewritten at the checkpoint)
    redo = sample_examples(con, SOURCE, [0, 1, 2, 3], resample=True)
    assert redo.dead == [0] and redo.rare == [1] and redo.status_changed == 0
    # with a lower bar the rare feature is sampled
    report = sample_examples(con, SOURCE, [1], SamplingConfig(min_active=3))
    assert report.sampled == [1] and report.status_changed == 1


def test_near_duplicate_top_windows_are_dropped(con):
    info = build_db(con, duplicate_seqs=3)  # sequences 117..119 repeat sequence 0
    sample_examples(con, SOURCE, [3], SamplingConfig())
    top = [r for r in _examples(con, 3) if r["kind"] == "top"]
    seqs = {r["seq_id"] for r in top}
    assert len(seqs & {0, 117, 118, 119}) == 1  # equal peaks: the seeded hash picks one
    assert len(top) == SamplingConfig().total("top")
    info_nodedupe = sample_examples(con, SOURCE, [3], SamplingConfig(dedupe=False), resample=True)
    assert info_nodedupe.sampled == [3]
    seqs = {r["seq_id"] for r in _examples(con, 3) if r["kind"] == "top"}
    assert {0, 117, 118, 119} <= seqs


def test_load_examples_carries_raw_acts_tokens_and_max(db):
    con, info = db
    sample_examples(con, SOURCE, [2, 3])
    ex = load_examples(con, SOURCE, [0, 2, 3])
    assert sorted(ex) == [2, 3]  # the dead feature has no examples
    max3 = con.execute("SELECT max_act FROM features WHERE feature_id = 3").fetchone()[0]
    assert ex[3].max_act == pytest.approx(max3)
    for f in (2, 3):
        fe = ex[f]
        assert len(fe.windows) == sum(SamplingConfig().total(k) for k in ("top", "quantile", "random"))
        for w in fe.windows:
            want_ids = [int(t) for t in info["ids"][w.seq_id, w.start_pos:w.end_pos]]
            assert w.token_ids == want_ids
            assert w.tokens == [VOCAB[t] for t in want_ids]
            want = [float(np.float32(info["acts"].get((f, w.seq_id, p), 0.0)))
                    for p in range(w.start_pos, w.end_pos)]
            assert w.acts == pytest.approx(want)
    # splits come in order, the top windows first
    assert [w.split for w in ex[3].windows] == sorted((w.split for w in ex[3].windows),
                                                      key=SPLITS.index)
    assert ex[3].split("explain", "top")[0].max_act == pytest.approx(max3)


def test_top_windows_exact_when_the_top_entries_crowd_into_few_sequences(con):
    """A feature active at every position of 60 sequences, highest in the first ones: its top
    entries (a per-feature top-N read) span fewer sequences than the top pool, so the sampler
    falls back to grouping all its entries; the top windows still equal the brute force."""
    info = build_db(con, n_features=4)
    extra = {(3, s, p): 100.0 - s + 0.001 * p for s in range(60) for p in range(info["seq_len"])}
    con.execute("DELETE FROM activation_rows WHERE feature_id = 3")  # the storage table behind the view
    insert_acts(con, extra)
    info["acts"] = {k: v for k, v in info["acts"].items() if k[0] != 3} | extra
    cfg = SamplingConfig()
    report = sample_examples(con, SOURCE, [3], cfg)
    assert report.sampled == [3]
    want = _brute_force_top(info, 3, cfg.total("top"))
    rows = sorted((r for r in _examples(con, 3) if r["kind"] == "top"), key=lambda r: r["rank"])
    assert [r["seq_id"] for r in rows] == [s for s, _, _ in want]
    q = [r for r in _examples(con, 3) if r["kind"] == "quantile"]
    assert len(q) == cfg.total("quantile")
    assert not {r["seq_id"] for r in q} & {r["seq_id"] for r in rows}
