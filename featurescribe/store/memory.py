"""DuckDB's memory limit for the openings of a long run (a harvest, a label run).

Bounded, because DuckDB otherwise keeps every block it read or wrote cached, and the checkpoint
at closing rewrites a filled row group in memory (~300 MB for a row group of label vectors): the
run's memory would grow with the file. The bound sits on top of what the file's primary-key
indexes can take in memory: DuckDB's ART indexes cannot be evicted, and a fixed limit made inserts
fail once an index outgrew it (a ledger of a few million calls, eight SAEs of a million latents).
"""

from __future__ import annotations

import duckdb

RUN_HEADROOM_MB = 128  # above the indexes: enough for a chunk's sampling or a harvest commit
CHECKPOINT_HEADROOM_MB = 32  # above the indexes, for the checkpoint before a run's opening closes
ART_BYTES_PER_KEY = 128  # measured: 8 B a key (sequential integers) to 120 B (random 64-char hashes)


def index_bytes(con) -> int:
    """What the primary-key indexes of every table may take in memory, at most."""
    rows = con.execute(
        "SELECT coalesce(sum(estimated_size), 0) FROM duckdb_tables() WHERE has_primary_key").fetchone()[0]
    return int(rows) * ART_BYTES_PER_KEY


def limit_memory(con, headroom_mb: int = RUN_HEADROOM_MB, new_keys: int = 0) -> None:
    """SET memory_limit to `headroom_mb` above what the indexes take, with room for `new_keys`
    more keys (rows a statement is about to add to tables with a primary key)."""
    mb = headroom_mb + (index_bytes(con) + new_keys * ART_BYTES_PER_KEY) // 2**20
    con.execute(f"SET memory_limit = '{mb}MB'")


def lean_checkpoint(con, headroom_mb: int) -> None:
    """CHECKPOINT under a tighter bound than the opening's work (`headroom_mb`) needed.

    The checkpoint at closing rewrites a table's last, partly filled row group in memory: up to the
    whole bound (~150 MB above the steady state of a label run at 100k features), though it needs
    only a few blocks at a time (2 MB were enough for 120k rows of 384-d vectors). Run before
    closing, it leaves the closing nothing to write. If it fails, what was committed is still in
    the write-ahead log: after a fatal error (DuckDB invalidates an instance whose checkpoint ran
    out of memory) the next opening replays it; after another, the closing checkpoints under the
    opening's bound as before."""
    limit_memory(con, CHECKPOINT_HEADROOM_MB)
    try:
        con.execute("CHECKPOINT")
    except duckdb.FatalException:
        return
    except duckdb.Error:
        limit_memory(con, headroom_mb)
