"""Parts of benchmarks/harvest.py: the store's ingest rate, and the speedup of sharded harvests.

store ingest: synthetic items shaped like an SAE harvest's (batches of 32 sequences x 63 harvested
positions, 16,384 latents, 64 kept per token) go through the harvest's own writers, from numpy
arrays to committed rows of `activations`; the same items with one commit per batch (today's
layout before this change), and a single bare Arrow insert of the columns (DuckDB's floor) are
timed in the same run, in wall time and in process CPU time (all threads; the figure to compare
when other processes share the machine), after an untimed warm-up pass through the writers (whose
rate is printed as the cold first pass).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

SAE_WIDTH, PER_TOKEN, B, T = 16_384, 64, 32, 64


def synthetic_items(n_items: int, seed: int = 0) -> list:
    from featurescribe.harvest.batches import Batch
    from featurescribe.harvest.writer import Item

    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(B, dtype=np.int32), (T - 1) * PER_TOKEN)
    pos = np.tile(np.repeat(np.arange(1, T, dtype=np.int32), PER_TOKEN), B)
    out = []
    for i in range(n_items):
        feat = rng.integers(0, SAE_WIDTH, len(rows), dtype=np.int32)
        vals = rng.random(len(rows), dtype=np.float32)
        ids = np.arange(i * B, (i + 1) * B, dtype=np.int64)
        out.append(Item(Batch(ids, ids, [np.zeros(T, np.int32)] * B, np.zeros(B, bool)),
                        [(0, np.stack([rows, pos, feat], 1), vals)]))
    return out


def _through_writers(items: list, **writer_kw) -> tuple[float, int]:
    from featurescribe.harvest.batches import SeqIds
    from featurescribe.harvest.writer import RowMaker, Writers
    from featurescribe.store import open_db
    from featurescribe.store.harvest_rows import harvest_source_keys

    with tempfile.TemporaryDirectory() as tmp:
        con = open_db(os.path.join(tmp, "ingest.duckdb"))
        con.execute("SET memory_limit = '256MB'")
        keys = harvest_source_keys(con, ["6-res-sae16k"])
        t0, c0 = time.perf_counter(), time.process_time()
        w = Writers(con, RowMaker(["6-res-sae16k"], keys, "tok", "corpus", None, SeqIds(0)), **writer_kw)
        for it in items:
            w.put(it)
        w.close()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = con.execute("SELECT count(*) FROM activations WHERE source_id = '6-res-sae16k'").fetchone()[0]
        con.close()
    return seconds, cpu, n


def _bare_insert(items: list) -> tuple[float, float]:
    import duckdb
    import pyarrow as pa

    cols = {"feature_id": np.concatenate([it.parts[0][1][:, 2] for it in items]),
            "seq_id": np.concatenate([it.batch.seq_ids[it.parts[0][1][:, 0]] for it in items]),
            "pos": np.concatenate([it.parts[0][1][:, 1] for it in items]),
            "act": np.concatenate([it.parts[0][2] for it in items])}
    table = pa.table(cols)  # noqa: F841 - read by DuckDB's replacement scan
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect(os.path.join(tmp, "bare.duckdb"))
        con.execute("CREATE TABLE a (feature_id INTEGER, seq_id BIGINT, pos INTEGER, act REAL)")
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, table.num_rows, 1 << 20):
            piece = table.slice(i, 1 << 20)  # noqa: F841
            con.execute("INSERT INTO a SELECT * FROM piece")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        con.close()
    return seconds, cpu


def ingest(n_items: int) -> dict:
    items = synthetic_items(n_items)
    n = sum(it.n_entries for it in items)
    # untimed: a process's first DuckDB writes page in its heap and start DuckDB's threads (about
    # 0.2 s once per process, half of the quick size's whole run); a harvest pays it once
    cold_s, _, _ = _through_writers(items[:4])
    new_s, new_cpu, stored = _through_writers(items)
    old_s, old_cpu, _ = _through_writers(items, threads=1, flush_entries=0)
    bare_s, bare_cpu = _bare_insert(items)
    assert stored == n, (stored, n)
    return {"entries": n, "cold_first": sum(it.n_entries for it in items[:4]) / cold_s, "new": n / new_s, "per_batch": n / old_s, "bare": n / bare_s,
            "new_cpu": n / new_cpu, "per_batch_cpu": n / old_cpu, "bare_cpu": n / bare_cpu,
            "by_threads": by_writer_threads(items)}


def by_writer_threads(items: list) -> dict[int, float]:
    """Entries per second through 1, 2, 4 and 8 writer threads (as many as there are cores): on a
    many-core GPU machine, whether more writers than the default 2 would keep up with the GPU."""
    n = sum(it.n_entries for it in items)
    cores = os.cpu_count() or 1
    return {k: n / _through_writers(items, threads=k)[0] for k in (1, 2, 4, 8) if k <= max(2, cores)}


def shard_speed(tokens: int, model: str, corpus: str) -> dict:
    """The same harvest as 3 shards on 3 local Dask worker processes, and as 1 shard on 1."""
    from featurescribe.harvest.harvester import HarvestConfig
    from featurescribe.harvest.shards import harvest_sharded

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 3):
            cfg = HarvestConfig(db=os.path.join(tmp, f"s{n}.duckdb"), model=model, layer=6, site="mlp",
                                corpus=corpus, max_tokens=tokens, ctx=64, batch_size=16, device="cpu",
                                progress=False)
            t0 = time.perf_counter()
            rs = harvest_sharded(cfg, n, task_runner="dask", workers=n)
            out[n] = {"wall": time.perf_counter() - t0,
                      "shard_s": max(d.get("seconds", 0.0) for d in rs[0].extra["shards"]),
                      "entries": rs[0].n_activations}
    assert out[1]["entries"] == out[3]["entries"]
    return {"wall_1": out[1]["wall"], "wall_3": out[3]["wall"], "speedup": out[1]["wall"] / out[3]["wall"],
            "stream_speedup": out[1]["shard_s"] / out[3]["shard_s"], "cores": os.cpu_count()}
