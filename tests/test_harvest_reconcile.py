"""Two harvests on one file at the same time: a commit reconciles with what the other run wrote since
this one planned (featurescribe/store/harvest_reconcile.py).

The interleaving is forced: harvest A plans its sequence ids and runs its first batch, then, before its
first commit, a second `featurescribe harvest` process runs to the end on the same file; then A commits.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing

import numpy as np
import pyarrow as pa
import pytest

from featurescribe.harvest.batches import SeqIds
from featurescribe.store import open_db
from featurescribe.store.harvest_rows import harvest_source_keys, write_harvest_rows
from tests.dbq import q

CTX, TOKENS = 16, 40 * 16


def _sequences(ids, corpus: str, index) -> pa.Table:
    n = len(ids)
    return pa.table({"seq_id": pa.array(ids, pa.int64()), "token_ids": [[7, 8]] * n, "tokens": [["a", "b"]] * n,
                     "tokenizer_id": ["tok"] * n, "corpus": [corpus] * n,
                     "corpus_index": pa.array(index, pa.int64())})


def _progress(source: str, ids) -> pa.Table:
    return pa.table({"source_id": pa.array([source] * len(ids)).dictionary_encode(),
                     "seq_id": pa.array(ids, pa.int64())})


def _acts(key: int, ids) -> pa.Table:
    n = len(ids)
    return pa.table({"source_key": pa.array([key] * n, pa.int32()), "feature_id": pa.array(range(n), pa.int32()),
                     "seq_id": pa.array(ids, pa.int64()), "pos": pa.array([1] * n, pa.int32()),
                     "act": pa.array(np.linspace(1, 2, n), pa.float32())})


def test_planned_ids_taken_by_other_sequences_get_fresh_ids(db_path):
    with closing(open_db(db_path)) as con:
        other = harvest_source_keys(con, ["0-other"])[0]
        write_harvest_rows(con, _sequences(range(10), "corpus-x", range(10)), _acts(other, range(10)),
                           _progress("0-other", range(10)))
        key = harvest_source_keys(con, ["1-mine"])[0]
        # planned from an earlier read: ids 5..9 now hold corpus-x's sequences
        n = write_harvest_rows(con, _sequences(range(5, 15), "corpus-y", range(10)), _acts(key, range(5, 15)),
                               _progress("1-mine", range(5, 15)), SeqIds(15).take)
    assert n == 10
    assert q(db_path, "SELECT count(*), count(DISTINCT seq_id) FROM sequences") == [(20, 20)]
    # the clashing five moved to fresh ids past the file's last one; the others kept theirs
    assert q(db_path, "SELECT corpus_index, seq_id FROM sequences WHERE corpus = 'corpus-y' ORDER BY 1") == \
        [(i, 15 + i) for i in range(5)] + [(i, 5 + i) for i in range(5, 10)]
    # every entry and progress row follows its sequence
    assert q(db_path, "SELECT a.feature_id, s.corpus_index FROM activations a JOIN sequences s USING (seq_id) "
                      "WHERE a.source_id = '1-mine' ORDER BY 1") == [(i, i) for i in range(10)]
    assert q(db_path, "SELECT count(*) FROM harvest_progress p JOIN sequences s USING (seq_id) "
                      "WHERE p.source_id = '1-mine' AND s.corpus = 'corpus-y'") == [(10,)]
    assert q(db_path, "SELECT count(*) FROM activations WHERE source_id = '0-other'") == [(10,)]


def test_sequences_and_pairs_another_run_stored_are_not_written_twice(db_path):
    with closing(open_db(db_path)) as con:
        key = harvest_source_keys(con, ["1-mine"])[0]
        write_harvest_rows(con, _sequences([3, 4], "c", [0, 1]), _acts(key, [3, 4]), _progress("1-mine", [3, 4]))
        # the same source planned sequences 0..3 as new with ids 0..3 before the other run committed
        n = write_harvest_rows(con, _sequences(range(4), "c", range(4)), _acts(key, range(4)),
                               _progress("1-mine", range(4)), SeqIds(4).take)
    assert n == 2  # the entries of corpus indices 2 and 3; 0 and 1 are the other run's
    # 0 and 1 take the stored ids; 2 keeps its planned id; 3's planned id is sequence 0's: a fresh one
    assert q(db_path, "SELECT corpus_index, seq_id FROM sequences ORDER BY 1") == [(0, 3), (1, 4), (2, 2), (3, 5)]
    assert q(db_path, "SELECT count(*), count(DISTINCT seq_id) FROM harvest_progress") == [(4, 4)]
    assert q(db_path, "SELECT s.corpus_index, a.feature_id FROM activations a JOIN sequences s USING (seq_id) "
                      "ORDER BY 1") == [(0, 0), (1, 1), (2, 2), (3, 3)]


def _harvest_cli(db: str, corpus: str, layer: int, *extra: str) -> None:
    out = subprocess.run([sys.executable, "-m", "featurescribe", "harvest", "--db", db, "--model", "smollm2-135m",
                          "--layer", str(layer), "--corpus", corpus, "--ctx", str(CTX), "--max-tokens",
                          str(TOKENS), "--batch-size", "4", "--no-progress", *extra],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _rows(db: str, source: str):
    """A source's entries by corpus position (seq ids may differ between files)."""
    return q(db, "SELECT a.feature_id, s.corpus_index, a.pos, a.act FROM activations a JOIN sequences s "
                 "USING (seq_id) WHERE a.source_id = ? ORDER BY 1, 2, 3", [source])


@pytest.mark.parametrize("other_layer", [3, 2], ids=["another-layer", "same-source"])
def test_a_harvest_that_another_finished_meanwhile_gets_exactly_its_own_rows(
        tmp_path, monkeypatch, smollm2, other_layer):
    from featurescribe.harvest import writer
    from featurescribe.harvest.harvester import HarvestConfig, harvest
    from tests.test_harvest import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 8)
    db, alone = str(tmp_path / "both.duckdb"), str(tmp_path / "alone.duckdb")
    for layer in {2, other_layer}:
        _harvest_cli(alone, str(corpus), layer)
    put, ran = writer.Writers.put, []

    def other_run_first(self, item):
        if not ran:  # A's first batch: A planned and holds no opening; its first commit comes later
            _harvest_cli(db, str(corpus), other_layer)
            ran.append(True)
        return put(self, item)

    monkeypatch.setattr(writer.Writers, "put", other_run_first)
    harvest(HarvestConfig(db=db, model="smollm2-135m", layer=2, corpus=str(corpus), ctx=CTX, max_tokens=TOKENS,
                          batch_size=4, progress=False), loaded=smollm2)
    assert ran
    assert q(db, "SELECT count(*), count(DISTINCT corpus_index), count(DISTINCT seq_id) FROM sequences") == \
        q(alone, "SELECT count(*), count(DISTINCT corpus_index), count(DISTINCT seq_id) FROM sequences")
    for source in {"2-mlp", f"{other_layer}-mlp"}:
        got, want = _rows(db, source), _rows(alone, source)
        assert len(got) == len(want) > 0
        assert [r[:3] for r in got] == [r[:3] for r in want]
        np.testing.assert_allclose([r[3] for r in got], [r[3] for r in want], rtol=1e-5, atol=1e-6)
        assert q(db, "SELECT n_active FROM features WHERE source_id = ? ORDER BY feature_id", [source]) == \
            q(alone, "SELECT n_active FROM features WHERE source_id = ? ORDER BY feature_id", [source])
    assert q(db, "SELECT count(*), count(DISTINCT (source_id, seq_id)) FROM harvest_progress") == \
        q(alone, "SELECT count(*), count(DISTINCT (source_id, seq_id)) FROM harvest_progress")


def test_a_source_created_meanwhile_with_other_settings_stops_the_harvest_with_one_line(
        tmp_path, monkeypatch, smollm2):
    from featurescribe.errors import FeaturescribeError
    from featurescribe.harvest import harvester, writer
    from tests.test_harvest import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 8)
    db = str(tmp_path / "both.duckdb")
    put, ran = writer.Writers.put, []

    def other_run_first(self, item):  # another run creates 2-mlp with its own threshold first
        if not ran:
            _harvest_cli(db, str(corpus), 2, "--threshold", "0.3")
            ran.append(True)
        return put(self, item)

    monkeypatch.setattr(writer.Writers, "put", other_run_first)
    with pytest.raises(FeaturescribeError, match="source 2-mlp was created meanwhile by another harvest, with "
                                                 r"threshold 0\.3 \(now 0\.5\)"):
        harvester.harvest(harvester.HarvestConfig(
            db=db, model="smollm2-135m", layer=2, corpus=str(corpus), ctx=CTX, max_tokens=TOKENS, batch_size=4,
            threshold="0.5", progress=False), loaded=smollm2)
    # the other run's rows are whole, and nothing of this one was written
    assert q(db, "SELECT threshold, n_tokens > 0 FROM sources") == [(0.3, True)]
    assert q(db, "SELECT count(*) FROM activations WHERE act < 0.3") == [(0,)]
