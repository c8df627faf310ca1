"""Export streams: Python's memory stays flat as the number of features grows.

A reader that pulled a whole table into Python would hold every row at once: at 100k features
that is hundreds of thousands of rows (tens of MB of Python objects) against a few thousand for
one record batch. Peaks are compared at 10k and 50k features (not timed; tracing every
allocation makes Python several times slower, so the sizes stay moderate).
"""

from __future__ import annotations

import shutil
import sys
import tracemalloc

import pytest

from featurescribe.store import open_db
from featurescribe.store.export_queries import export_sources, iter_feature_bundles
from tests.export_fixtures import build_large_db

MB = 1 << 20
SMALL, LARGE = 10_000, 50_000


@pytest.fixture(scope="module")
def large_dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    dbs = {}
    for n in (SMALL, LARGE):
        dbs[n] = str(root / f"f{n}.duckdb")
        build_large_db(dbs[n], n, windows=1, window_len=4)
    return dbs


def test_feature_streams_keep_traced_memory_flat(large_dbs):
    peaks = {}
    for n, db in large_dbs.items():
        con = open_db(db, read_only=True, create=False)
        try:
            src = export_sources(con)[0]["source_id"]
            tracemalloc.start()
            try:
                count = 0
                for b in iter_feature_bundles(con, src, histogram=True):
                    count += 1
                    assert b.explanations and b.examples
                peaks[n] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert count == n
        finally:
            con.close()
    print({n: f"{p / MB:.1f} MiB" for n, p in peaks.items()})
    assert peaks[LARGE] < 64 * MB
    # five times the features, nowhere near five times the memory
    assert peaks[LARGE] < 1.5 * peaks[SMALL] + 4 * MB


@pytest.mark.parametrize("fmt", ["json", "neuronpedia"])
def test_writers_hold_no_growing_state(large_dbs, tmp_path, fmt):
    """The writers' live Python objects, sampled after every feature, do not grow with size."""
    from featurescribe.export.neuronpedia import write_neuronpedia
    from featurescribe.export.tabular import write_json

    write = {"json": write_json, "neuronpedia": write_neuronpedia}[fmt]
    peaks = {}
    for n in (2_000, 10_000):
        db = str(tmp_path / f"w{n}.duckdb")
        build_large_db(db, n, windows=2, window_len=8)
        con = open_db(db, read_only=True, create=False)
        try:
            base = sys.getallocatedblocks()
            peak = [0]

            def sample():
                peak[0] = max(peak[0], sys.getallocatedblocks() - base)

            out = tmp_path / f"out{n}"
            write(con, export_sources(con), out, on_feature=sample)
            peaks[n] = peak[0]
            shutil.rmtree(out)
        finally:
            con.close()
    print(peaks)
    assert peaks[10_000] < 1.5 * peaks[2_000] + 20_000
