"""DuckDB's memory limit for the openings of a long run (a harvest, a label run).

Bounded, because DuckDB otherwise keeps every block it read or wrote cached, and the checkpoint
at closing rewrites a filled row group in memory (~300 MB for a row group of label vectors): the
run's memory would grow with the file. The bound sits on top of what the file's primary-key
indexes can take in memory: DuckDB's ART indexes cannot be evicted, and a fixed limit made inserts
fail once an index outgrew it (a ledger of a few million calls, eight SAEs of a million latents).
"""

from __future__ import annotations

RUN_HEADROOM_MB = 128  # above the indexes: enough for a chunk's sampling or a harvest commit
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
