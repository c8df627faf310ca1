"""Windows for any alive feature, read from `activations` (nothing is written).

A label run samples and stores windows in `examples` for the features it labels; every other
feature has none there. These queries give any feature its top, quantile and random windows
straight from `activations`, in the same row shape as the export stream's sampled windows
(`feature_id, kind, split, seq_id, start_pos, end_pos, rank, quantile, tokens, nz_pos, nz_act,
win_max`), with `split` NULL: they were not dealt to explain/valid/test.

- top: the sequences with the feature's highest peaks, one window around each peak;
- quantile: the other active sequences in 4 equal-count bins by peak, `per_bin` drawn from each
  by a hash of (seed, feature, sequence);
- random: sequences of the source taken from one hashed order at a per-feature offset, at a
  hashed position (the feature may be silent there).

Windows are `window` tokens, about 3/4 of them before the peak, clipped to the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowCounts:
    top: int = 10
    per_bin: int = 2
    random: int = 5
    bins: int = 4
    window: int = 32
    seed: int = 0

    def params(self) -> dict:
        return {"n_top": self.top, "per_bin": self.per_bin, "n_random": self.random, "nq": self.bins,
                "w": self.window, "left": (3 * self.window) // 4, "seed": self.seed}


# The source's sequences (all of them in a database built without harvest bookkeeping) in one
# hashed order: random windows are taken from it at a per-feature offset.
SEQUENCE_ORDER_SQL = """
    WITH harvested AS (SELECT seq_id FROM harvest_progress WHERE source_id = $source)
    SELECT s.seq_id, len(s.token_ids) AS seq_len,
           row_number() OVER (ORDER BY hash($seed, s.seq_id), s.seq_id) - 1 AS r, count(*) OVER () AS n_total
    FROM sequences s
    WHERE s.seq_id IN (SELECT seq_id FROM harvested) OR NOT EXISTS (SELECT 1 FROM harvested)"""

_SQL = """
WITH a AS {materialized} (
    SELECT feature_id, seq_id, pos, act FROM activations
    WHERE source_id = $source AND act > 0 {feature_filter}),
per_seq AS (
    SELECT feature_id, seq_id, max(act) AS peak, arg_max(pos, (act, -pos)) AS peak_pos
    FROM a GROUP BY feature_id, seq_id),
ranked AS (
    SELECT p.*, s.seq_len,
           row_number() OVER (PARTITION BY feature_id ORDER BY peak DESC, seq_id) AS rk,
           count(*) OVER (PARTITION BY feature_id) AS n_seqs
    FROM per_seq p JOIN ({lengths}) s USING (seq_id)),
top_w AS (
    SELECT feature_id, seq_id, seq_len, peak_pos, 'top' AS kind, rk AS rank, NULL::INTEGER AS quantile
    FROM ranked WHERE rk <= $n_top),
q_w AS (
    SELECT feature_id, seq_id, seq_len, peak_pos, 'quantile' AS kind,
           row_number() OVER (PARTITION BY feature_id, q ORDER BY hash($seed, feature_id, seq_id), seq_id) AS rank,
           q AS quantile
    FROM (SELECT *, (1 + (n_seqs - rk) * $nq // greatest(1, n_seqs - $n_top))::INTEGER AS q
          FROM ranked WHERE rk > $n_top)
    QUALIFY rank <= $per_bin),
seqs AS ({order}),
feats AS (SELECT DISTINCT feature_id FROM per_seq),
r_pick AS (  -- an equi-join on r below (a hash join, not a range join over every sequence)
    SELECT f.feature_id, i, (hash($seed, f.feature_id, 'random') + i) % n.n_total AS r
    FROM feats f CROSS JOIN range($n_random) t(i) CROSS JOIN (SELECT count(*) AS n_total FROM seqs) n
    WHERE i < n.n_total),
r_w AS (
    SELECT p.feature_id, s.seq_id, s.seq_len, NULL::INTEGER AS peak_pos, 'random' AS kind,
           (p.i + 1)::BIGINT AS rank, NULL::INTEGER AS quantile
    FROM r_pick p JOIN seqs s ON s.r = p.r),
w AS (
    SELECT *, (CASE WHEN kind = 'random'
                    THEN hash($seed, feature_id, seq_id, 'start') % greatest(1, seq_len - $w + 1)
                    ELSE greatest(0, least(peak_pos - $left, seq_len - $w)) END)::INTEGER AS start_pos
    FROM (SELECT * FROM top_w UNION ALL SELECT * FROM q_w UNION ALL SELECT * FROM r_w)),
acts AS (
    SELECT w.feature_id, w.kind, w.seq_id, w.start_pos,
           list(a.pos - w.start_pos ORDER BY a.pos) AS nz_pos, list(a.act ORDER BY a.pos) AS nz_act,
           max(a.act) AS win_max
    FROM w JOIN a ON a.feature_id = w.feature_id AND a.seq_id = w.seq_id
                 AND a.pos >= w.start_pos AND a.pos < w.start_pos + $w
    GROUP BY ALL)
SELECT w.feature_id, w.kind, NULL::VARCHAR AS split, w.seq_id, w.start_pos,
       least(w.start_pos + $w, w.seq_len)::INTEGER AS end_pos, w.rank::INTEGER AS rank, w.quantile,
       s.tokens[w.start_pos + 1 : least(w.start_pos + $w, w.seq_len)] AS tokens,
       coalesce(x.nz_pos, []) AS nz_pos,
       coalesce(list_transform(x.nz_act, lambda v: CAST(CAST(v AS VARCHAR) AS DOUBLE)), []) AS nz_act,
       coalesce(x.win_max, 0) AS win_max
FROM w JOIN sequences s USING (seq_id)
LEFT JOIN acts x USING (feature_id, kind, seq_id, start_pos)
ORDER BY w.feature_id, CASE w.kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END,
         w.quantile NULLS FIRST, w.rank, w.seq_id
"""


@dataclass(frozen=True)
class SequenceTables:
    """Where the windows query reads sequence lengths (`seq_id, seq_len`) and the source's
    sequences in their hashed order (`seq_id, seq_len, r, n_total`, r from 0, for `$source`).
    By default both are computed from `sequences` in the query; a reader of many single features
    (the browser) computes them once (store/browse_queries.py) and names them here."""

    lengths: str = "SELECT seq_id, len(token_ids) AS seq_len FROM sequences"
    order: str = SEQUENCE_ORDER_SQL


def windows_sql(*, one_feature: bool, skip_sampled: bool = False,
                tables: SequenceTables = SequenceTables()) -> str:
    """The query for one feature (`$feature`) or a whole source, optionally only the features
    that have no rows in `examples` (the export streams fill those in)."""
    flt = "AND feature_id = $feature" if one_feature else ""
    if skip_sampled:
        flt += " AND feature_id NOT IN (SELECT DISTINCT feature_id FROM examples WHERE source_id = $source)"
    # one feature's rows are few: read them once; a whole source's are scanned where needed
    return _SQL.format(feature_filter=flt, materialized="MATERIALIZED" if one_feature else "",
                       lengths=tables.lengths, order=tables.order)


def fill_stream_sql(source_id: str, counts: WindowCounts = WindowCounts()) -> tuple[str, dict]:
    """The whole-source query (features without sampled windows only) and its parameters."""
    return windows_sql(one_feature=False, skip_sampled=True), {"source": source_id, **counts.params()}


def keep_windows(windows: list[dict], kinds: tuple[str, ...] | None, per_kind: int | None) -> list[dict]:
    """The windows of `kinds` (all when None), at most `per_kind` of each, in their order."""
    seen: dict[str, int] = {}
    out = []
    for w in windows:
        if kinds and w["kind"] not in kinds:
            continue
        seen[w["kind"]] = seen.get(w["kind"], 0) + 1
        if per_kind is None or seen[w["kind"]] <= per_kind:
            out.append(w)
    return out


def feature_windows(con, source_id: str, feature_id: int, counts: WindowCounts = WindowCounts(),
                    tables: SequenceTables = SequenceTables()) -> list[dict]:
    """One feature's windows from `activations`, with dense `acts` per token."""
    cur = con.execute(windows_sql(one_feature=True, tables=tables),
                      {"source": source_id, "feature": int(feature_id), **counts.params()})
    cols = [c[0] for c in cur.description]
    return [densify(dict(zip(cols, r))) for r in cur.fetchall()]


def densify(row: dict) -> dict:
    """A window row with its sparse activations spread over its tokens (`acts`)."""
    tokens = list(row["tokens"] or [])
    acts = [0.0] * len(tokens)
    for p, v in zip(row["nz_pos"], row["nz_act"]):
        if 0 <= p < len(acts):
            acts[p] = v
    keep = ("kind", "split", "seq_id", "start_pos", "end_pos", "rank", "quantile")
    return {**{k: row.get(k) for k in keep}, "tokens": tokens, "acts": acts}
