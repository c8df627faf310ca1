"""`harvest --shards N`: 3 shards on a local Dask cluster give every row of a one-process harvest; a
killed shard is re-run alone; shard files of another split or other settings are refused."""

from __future__ import annotations

import os

import pytest

from featurescribe.cli import main
from featurescribe.harvest import corpus as corpus_mod
from featurescribe.harvest.harvester import HarvestConfig, harvest_all
from featurescribe.harvest.shards import harvest_sharded, plan_shards, run_shard, shard_dir
from featurescribe.store import open_db

pytestmark = pytest.mark.slow

CTX = 16
N_SEQ = 12
TEXT = ("import os\nfor name in os.listdir('.'):\n    print(name.upper())\n"
        "A harvest reads activations; the merge must give the same rows as one process would. 42 + 17 = 59.\n") * 6


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return str(p)


def cfg(db, corpus, **kw):
    base = dict(db=db, model="smollm2-135m", layer="1,2", site="mlp,resid", corpus=corpus, ctx=CTX,
                max_tokens=N_SEQ * CTX, batch_size=2, progress=False)
    base.update(kw)
    return HarvestConfig(**base)


def dump(db):
    con = open_db(db, read_only=True)
    try:
        return {
            "activations": con.execute("SELECT source_id, feature_id, seq_id, pos, act FROM activations "
                                       "ORDER BY ALL").fetchall(),
            "features": con.execute("SELECT * FROM features ORDER BY source_id, feature_id").fetchall(),
            "sources": con.execute("SELECT * EXCLUDE (params, created_at) FROM sources ORDER BY 1").fetchall(),
            "sequences": con.execute("SELECT * FROM sequences ORDER BY seq_id").fetchall(),
            "progress": con.execute("SELECT * FROM harvest_progress ORDER BY ALL").fetchall(),
        }
    finally:
        con.close()


def assert_same(a, b):
    assert len(a["activations"]) > 1000
    for table in a:
        assert a[table] == b[table], table


def test_three_shards_on_dask_equal_one_process(smollm2, tmp_path, corpus_file, prefect_server):
    one = str(tmp_path / "one.duckdb")
    harvest_all(cfg(one, corpus_file), loaded=smollm2)
    sharded = str(tmp_path / "sharded.duckdb")
    results = harvest_sharded(cfg(sharded, corpus_file), 3, task_runner="dask", workers=3)
    assert [r.source_id for r in results] == ["1-mlp", "1-res", "2-mlp", "2-res"]
    assert all(r.n_sequences == N_SEQ for r in results)
    assert sorted(d["shard"] for d in results[0].extra["shards"]) == [0, 1, 2]
    assert_same(dump(one), dump(sharded))
    assert not shard_dir(sharded).exists()
    # running it again runs no shard and adds nothing
    again = harvest_sharded(cfg(sharded, corpus_file), 3, task_runner="thread")
    assert again[0].extra["shards"] == [] and again[0].new_tokens == 0
    assert_same(dump(one), dump(sharded))


def test_killed_shard_is_rerun_alone(smollm2, tmp_path, corpus_file, monkeypatch, prefect_server):
    one = str(tmp_path / "one.duckdb")
    harvest_all(cfg(one, corpus_file), loaded=smollm2)
    db = str(tmp_path / "killed.duckdb")
    plan = plan_shards(cfg(db, corpus_file), 3, loaded=smollm2)
    from dataclasses import asdict

    plan = asdict(plan)
    assert plan["ranges"] == [(0, 4), (4, 8), (8, 12)]
    run_shard(plan, 0)
    run_shard(plan, 2)
    real = corpus_mod.sequences

    def dies_in_shard_1(*a, **kw):
        for s in real(*a, **kw):
            if s.corpus_index == 6:
                raise KeyboardInterrupt  # as a killed worker: what was committed stays
            yield s

    monkeypatch.setattr(corpus_mod, "sequences", dies_in_shard_1)
    with pytest.raises(KeyboardInterrupt):
        run_shard(plan, 1)
    monkeypatch.setattr(corpus_mod, "sequences", real)
    results = harvest_sharded(cfg(db, corpus_file), 3, task_runner="thread")
    ran = {d["shard"]: d for d in results[0].extra["shards"]}
    assert ran[0]["skipped"] and ran[2]["skipped"] and not ran[1]["skipped"]
    assert ran[1]["new_tokens"] == 2 * CTX  # sequences 6 and 7: 4 and 5 were committed before the kill
    assert_same(dump(one), dump(db))


def cli_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("featurescribe: error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_shard_inputs(smollm2, tmp_path, corpus_file, capsys):
    db = str(tmp_path / "s.duckdb")
    base = ["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "1", "--corpus", corpus_file,
            "--ctx", str(CTX), "--max-tokens", str(N_SEQ * CTX), "--batch-size", "2", "--no-progress"]
    assert "--shards must be at least 1" in cli_error(base + ["--shards", "0"], capsys)
    assert "more than the corpus's 12 sequences" in cli_error(base + ["--shards", "13"], capsys)
    assert not os.path.exists(db)
    plan = plan_shards(cfg(db, corpus_file, layer="1", site="mlp"), 2, loaded=smollm2)
    from dataclasses import asdict

    run_shard(asdict(plan), 0)  # a shard of a 2-way split, left behind
    err = cli_error(base + ["--shards", "3"], capsys)
    assert "2 shards" in err and "overlap" in err
    err = cli_error(base + ["--shards", "2", "--threshold", "0.5"], capsys)
    assert "other settings" in err and "thresholds" in err


def test_two_shards_on_threads_equal_one_process(smollm2, tmp_path, corpus_file, prefect_server):
    one = str(tmp_path / "one.duckdb")
    harvest_all(cfg(one, corpus_file, layer="2", site="mlp", sae=None), loaded=smollm2)
    db = str(tmp_path / "threads.duckdb")
    results = harvest_sharded(cfg(db, corpus_file, layer="2", site="mlp"), 2, task_runner="thread")
    assert not any(d["skipped"] for d in results[0].extra["shards"])
    assert_same(dump(one), dump(db))


def test_a_merge_stopped_while_removing_the_shard_files_is_finished_by_a_rerun(smollm2, tmp_path, corpus_file,
                                                                               prefect_server):
    """Killed after the merge committed, between the removal of shard 0's file and shard 1's: every
    re-run used to fail with 'shard(s) 0 of 2 are not complete; run the same command again'."""
    from dataclasses import asdict

    from featurescribe.harvest.shards import merge, shard_path

    one = str(tmp_path / "one.duckdb")
    harvest_all(cfg(one, corpus_file, layer="2", site="mlp"), loaded=smollm2)
    db = str(tmp_path / "db.duckdb")
    plan = asdict(plan_shards(cfg(db, corpus_file, layer="2", site="mlp"), 2, loaded=smollm2))
    run_shard(plan, 0)
    run_shard(plan, 1)
    left = shard_path(db, 1, 2)
    kept = left.read_bytes()
    merge(plan)
    left.parent.mkdir()
    left.write_bytes(kept)  # what the kill left: shard 1's file, shard 0's gone
    results = harvest_sharded(cfg(db, corpus_file, layer="2", site="mlp"), 2, task_runner="thread")
    assert results[0].extra["shards"] == [] and results[0].new_tokens == 0
    assert not shard_dir(db).exists()
    assert_same(dump(one), dump(db))
