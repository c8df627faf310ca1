"""Sampling: which windows of which sequences each feature is explained and scored on.

One SQL statement samples a whole batch of features (hundreds to tens of thousands) and writes
the result to `examples`; `load_examples` reads them back as `FeatureExamples` records with
the tokens and the raw per-token activations of every window.

Kinds of windows (column `kind` of `examples`):

- `top`: the sequences where the feature reaches its highest activations, one window per
  sequence around the sequence's peak (about 3/4 of the window is left context, clipped to the
  sequence). Windows with the same token ids as a higher-ranked window are dropped.
- `quantile`: active sequences other than the top ones, binned into `n_quantiles` equal-count
  bins by their peak activation (bin 1 the weakest), and drawn at random inside each bin, with
  the same window around the peak. These are the "random active" windows, stratified so that
  weak activations are represented.
- `random`: sequences drawn uniformly from the source's corpus (the sequences its harvest read,
  not another corpus's in the same database), the feature may be silent there; the window starts
  at a random position.

Splits: every window goes to exactly one of `explain`, `valid` and `test`, and a sequence is used
at most once per feature, so no window a scorer tests on overlaps a window the explainer saw. Top
windows are dealt to the splits in interleaved rank order (ranks 1, 2, 3, ... alternate between
the splits in proportion to their counts), so every split sees comparable peaks.

Everything random is a hash of (seed, feature, sequence): the same database and seed always give
the same examples.

A feature with no activations is marked `dead`, one active in fewer than `min_active` sequences
`rare` (`features.status`, with `features.skip_reason`); neither gets examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from featurescribe.records import KINDS, SPLITS, FeatureExamples, Window
from featurescribe.store.transaction import transaction

# entries read per top candidate (a sequence rarely holds more than a few of a feature's top
# entries), and the size of the uniform sample of active sequences the quantile bins are cut from
TOP_ENTRIES_PER_POOL = 3
QUANTILE_SAMPLE = 64

# windows per split and kind; quantile counts are spread over the bins (the highest bins get
# any remainder)
DEFAULT_COUNTS: dict[str, dict[str, int]] = {
    "explain": {"top": 20, "quantile": 4, "random": 0},
    "valid": {"top": 5, "quantile": 0, "random": 5},
    "test": {"top": 10, "quantile": 0, "random": 10},
}


def _frozen_counts(counts: Mapping[str, Mapping[str, int]]) -> tuple:
    return tuple((s, tuple((k, int(counts.get(s, {}).get(k, 0))) for k in KINDS)) for s in SPLITS)


@dataclass(frozen=True)
class SamplingConfig:
    """How many windows of which kind go to each split, and how they are cut."""

    window: int = 32  # tokens per window
    left_context: int | None = None  # tokens before the peak; default 3/4 of the window
    n_quantiles: int = 4
    counts: tuple = field(default_factory=lambda: _frozen_counts(DEFAULT_COUNTS))
    min_active: int = 10  # fewer active sequences than this: the feature is 'rare'
    seed: int = 0
    dedupe: bool = True  # drop top windows whose token ids equal a higher-ranked window's

    @classmethod
    def with_counts(cls, counts: Mapping[str, Mapping[str, int]], **kw) -> "SamplingConfig":
        """A config from a {split: {kind: n}} mapping (missing entries are 0)."""
        for s in counts:
            if s not in SPLITS:
                raise ValueError(f"unknown split {s!r}")
            for k in counts[s]:
                if k not in KINDS:
                    raise ValueError(f"unknown kind {k!r}")
        return cls(counts=_frozen_counts(counts), **kw)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1 token")
        if self.n_quantiles < 1:
            raise ValueError("n_quantiles must be at least 1")
        if self.min_active < 1:
            raise ValueError("min_active must be at least 1")

    @property
    def left(self) -> int:
        left = self.window * 3 // 4 if self.left_context is None else self.left_context
        return max(0, min(left, self.window - 1))

    def count(self, split: str, kind: str) -> int:
        return dict(dict(self.counts)[split])[kind]

    def total(self, kind: str) -> int:
        return sum(self.count(s, kind) for s in SPLITS)

    def as_dict(self) -> dict:
        return {
            "window": self.window, "left_context": self.left, "n_quantiles": self.n_quantiles,
            "counts": {s: dict(ks) for s, ks in self.counts}, "min_active": self.min_active,
            "seed": self.seed, "dedupe": self.dedupe,
        }


def interleave(counts: Sequence[int]) -> list[int]:
    """Deal len(counts) splits over sum(counts) ranks, each split in proportion to its count.

    The split of rank r is the one furthest behind its share after r ranks (ties to the first),
    so `interleave([2, 1, 1])` is [0, 1, 2, 0] and every split gets a spread of ranks.
    """
    total = sum(counts)
    given = [0] * len(counts)
    out = []
    for r in range(total):
        behind = [(c * (r + 1) / total - g) if g < c else -1e9 for c, g in zip(counts, given)]
        i = max(range(len(counts)), key=lambda j: (behind[j], -j))
        given[i] += 1
        out.append(i)
    return out


def _patterns(cfg: SamplingConfig) -> tuple[list[str], list[list[str]], list[str]]:
    """Split names by rank for top and random windows, and by (bin, rank) for quantile ones."""
    top = [SPLITS[i] for i in interleave([cfg.count(s, "top") for s in SPLITS])]
    rnd = [SPLITS[i] for i in interleave([cfg.count(s, "random") for s in SPLITS])]
    nq = cfg.n_quantiles
    per_bin: list[list[str]] = []
    for b in range(nq):  # b = 0 is the lowest bin; the highest bins take the remainders
        counts = []
        for s in SPLITS:
            c = cfg.count(s, "quantile")
            counts.append(c // nq + (1 if b >= nq - (c % nq) else 0))
        per_bin.append([SPLITS[i] for i in interleave(counts)])
    return top, per_bin, rnd


# ---------------------------------------------------------------------------------------------
# the sampling statements

# per feature of the batch: its entries, the value of its $r_top-th highest entry, and the hash
# below which about $q_sample of its sequences fall (from an estimate of their number). A table
# of its own, so that the sampling statement's planner knows it is small.
_STATS_SQL = """
CREATE OR REPLACE TEMP TABLE {tmp}_stats AS
SELECT feature_id, count(*) AS n_rows, list_min(max(act, $r_top)) AS top_floor,
       approx_count_distinct(seq_id) <= $q_sample AS sample_all,
       (least(1.0, $q_sample / approx_count_distinct(seq_id)) * 1.8446744073709e19)::UBIGINT
           AS h_limit
FROM activations
WHERE source_id = $source AND act > 0 AND feature_id BETWEEN $fmin AND $fmax
  AND feature_id IN (SELECT unnest($features::INTEGER[]))
GROUP BY feature_id
"""

_SAMPLE_SQL = """
CREATE OR REPLACE TEMP TABLE {tmp} AS
WITH feats AS (
    SELECT DISTINCT unnest($features::INTEGER[]) AS feature_id
),
act AS NOT MATERIALIZED (  -- the batch's active entries, read where a step needs them
    SELECT a.feature_id, a.seq_id, a.pos, a.act
    FROM activations a
    WHERE a.source_id = $source AND a.act > 0
      AND a.feature_id BETWEEN $fmin AND $fmax
      AND a.feature_id IN (SELECT feature_id FROM feats)
),
picked AS MATERIALIZED (  -- a second read keeps the entries at or above the top floor and every
                          -- entry of a uniform sample of the feature's sequences (seeded hash
                          -- below a threshold), so nothing groups all of a feature's entries
    SELECT a.feature_id, a.seq_id, a.pos, a.act, a.h, a.act >= s.top_floor AS is_top,
           s.sample_all OR a.h < s.h_limit AS in_sample
    FROM (SELECT feature_id, seq_id, pos, act, hash($seed, feature_id, seq_id) AS h
          FROM activations
          WHERE source_id = $source AND act > 0 AND feature_id BETWEEN $fmin AND $fmax) a
    JOIN {tmp}_stats s USING (feature_id)
    WHERE a.act >= s.top_floor OR s.sample_all OR a.h < s.h_limit
),
top_seq AS (  -- a sequence's first entry by (act desc, pos) is its peak
    SELECT feature_id, seq_id, act AS seq_max, pos AS peak_pos, h FROM picked WHERE is_top
    QUALIFY row_number() OVER (PARTITION BY feature_id, seq_id ORDER BY act DESC, pos) = 1
),
seen AS (
    SELECT feature_id, count(*) AS n_top_seqs FROM top_seq GROUP BY feature_id
),
exact AS (  -- the top entries decide the top candidates when they were all of the feature's
            -- entries or span enough sequences; n_seqs is then exact or a lower bound that
            -- still decides 'rare'. Features whose top entries crowd into a few sequences are
            -- grouped in full below.
    SELECT s.feature_id, n.n_top_seqs AS n_seqs,
           s.n_rows <= $r_top OR n.n_top_seqs >= $enough AS ok
    FROM {tmp}_stats s JOIN seen n USING (feature_id)
),
crowded_seq AS (
    SELECT a.feature_id, a.seq_id, max(a.act) AS seq_max, arg_max(a.pos, (a.act, -a.pos)) AS peak_pos,
           hash($seed, a.feature_id, a.seq_id) AS h
    FROM act a SEMI JOIN exact e ON e.feature_id = a.feature_id AND NOT e.ok
    GROUP BY a.feature_id, a.seq_id
),
n_active AS (
    SELECT feature_id, n_seqs FROM exact WHERE ok
    UNION ALL SELECT feature_id, count(*) FROM crowded_seq GROUP BY feature_id
),
per_seq AS (
    SELECT t.* FROM top_seq t SEMI JOIN exact e ON e.feature_id = t.feature_id AND e.ok
    UNION ALL SELECT feature_id, seq_id, seq_max, peak_pos, h FROM crowded_seq
),
seqlen AS (
    SELECT seq_id, len(token_ids) AS n FROM sequences
),
pool AS (  -- the top candidates, ranked by peak, highest first; ties broken by the seeded hash
    SELECT feature_id, seq_id, seq_max, peak_pos, h, rk
    FROM (SELECT *, row_number() OVER (PARTITION BY feature_id ORDER BY seq_max DESC, h, seq_id) AS rk
          FROM per_seq)
    WHERE rk <= $top_pool
),
top_pool AS (  -- a few more than needed, so dropping duplicates still leaves enough
    SELECT *, CASE WHEN $dedupe THEN hash(token_ids[start_pos + 1 : least(start_pos + $w, seq_len)])
                   ELSE seq_id::UBIGINT END AS win_hash
    FROM (SELECT t.feature_id, t.seq_id, t.seq_max, t.rk, len(s.token_ids) AS seq_len,
                 greatest(0, least(t.peak_pos - $left, len(s.token_ids) - $w))::INTEGER AS start_pos,
                 s.token_ids
          FROM pool t JOIN sequences s USING (seq_id))
    QUALIFY row_number() OVER (PARTITION BY feature_id, win_hash ORDER BY rk) = 1
),
top_win AS (
    SELECT feature_id, seq_id, start_pos, seq_len, seq_max,
           row_number() OVER (PARTITION BY feature_id ORDER BY rk) AS rnk
    FROM top_pool
    QUALIFY rnk <= $n_top
),
q_cand AS (  -- the sampled sequences other than the top candidates, exact peaks, highest first
    SELECT *, row_number() OVER (PARTITION BY feature_id ORDER BY seq_max DESC, h, seq_id) AS rk,
           count(*) OVER (PARTITION BY feature_id) AS n_s
    FROM (SELECT p.feature_id, p.seq_id, max(p.act) AS seq_max,
                 arg_max(p.pos, (p.act, -p.pos)) AS peak_pos, any_value(p.h) AS h
          FROM picked p ANTI JOIN pool t ON t.feature_id = p.feature_id AND t.seq_id = p.seq_id
          WHERE p.in_sample
          GROUP BY p.feature_id, p.seq_id)
),
q_bins AS (  -- the sample in n equal-count bins by peak (bin 1 the weakest), the ones with the
             -- smallest hash drawn from each bin
    SELECT feature_id, bin,
           min_by({{'seq_id': seq_id, 'peak_pos': peak_pos, 'seq_max': seq_max}},
                  (h, seq_id), $q_max) AS picks
    FROM (SELECT *, 1 + ((n_s - rk) * $nq // n_s) AS bin FROM q_cand)
    GROUP BY feature_id, bin
),
q_win AS (
    SELECT q.feature_id, q.bin, q.seq_id, l.n AS seq_len, q.seq_max, q.rnk,
           greatest(0, least(q.peak_pos - $left, l.n - $w))::INTEGER AS start_pos
    FROM (SELECT feature_id, bin, w.seq_id, w.peak_pos, w.seq_max, rnk
          FROM (SELECT feature_id, bin, unnest(picks) AS w, unnest(range(1, len(picks) + 1)) AS rnk
                FROM q_bins)
          WHERE rnk <= $q_counts[bin]) q
    JOIN seqlen l USING (seq_id)
),
used AS (
    SELECT feature_id, seq_id FROM pool
    UNION ALL SELECT feature_id, seq_id FROM q_win
),
harvested AS (SELECT seq_id FROM harvest_progress WHERE source_id = $source),
seq_order AS (  -- one shuffled order of the source's sequences (all of them in a database built
                -- without harvest bookkeeping); each feature starts at its own offset
    SELECT seq_id, n, (row_number() OVER (ORDER BY hash($seed, seq_id), seq_id) - 1) AS r,
           count(*) OVER () AS n_total
    FROM seqlen
    WHERE seq_id IN (SELECT seq_id FROM harvested) OR NOT EXISTS (SELECT 1 FROM harvested)
),
offsets AS (
    SELECT f.feature_id, hash($seed, f.feature_id, 'random') % o.n_total AS off, o.n_total
    FROM feats f CROSS JOIN (SELECT n_total FROM seq_order LIMIT 1) o
),
r_cand AS (
    SELECT o.feature_id, i, (o.off + i) % o.n_total AS r
    FROM offsets o CROSS JOIN range($r_pool) t(i)
    WHERE i < o.n_total
),
r_win AS (
    SELECT c.feature_id, s.seq_id, s.n AS seq_len,
           (hash($seed, c.feature_id, s.seq_id, 'start') % greatest(1, s.n - $w + 1))::INTEGER
               AS start_pos,
           row_number() OVER (PARTITION BY c.feature_id ORDER BY c.i) AS rnk
    FROM r_cand c JOIN seq_order s ON s.r = c.r
    ANTI JOIN used u ON u.feature_id = c.feature_id AND u.seq_id = s.seq_id
    QUALIFY rnk <= $n_random
)
SELECT f.feature_id, coalesce(na.n_seqs, 0) AS n_seqs, w.seq_id, w.start_pos,
       least(w.start_pos + $w, w.seq_len)::INTEGER AS end_pos, w.split, w.kind,
       w.rnk::INTEGER AS rank, w.quantile::INTEGER AS quantile, w.max_act::REAL AS max_act
FROM feats f
LEFT JOIN n_active na USING (feature_id)
LEFT JOIN (
    SELECT feature_id, seq_id, start_pos, seq_len, $top_pattern[rnk] AS split, 'top' AS kind,
           rnk, NULL AS quantile, seq_max AS max_act
    FROM top_win
    UNION ALL
    SELECT feature_id, seq_id, start_pos, seq_len, $q_pattern[bin][rnk], 'quantile', rnk, bin,
           seq_max
    FROM q_win
    UNION ALL
    SELECT feature_id, seq_id, start_pos, seq_len, $r_pattern[rnk], 'random', rnk, NULL, NULL
    FROM r_win
) w USING (feature_id)
"""

# the peak of each random window (the feature may be silent there: 0)
_RANDOM_MAX_SQL = """
UPDATE {tmp} t SET max_act = coalesce(m.max_act, 0)
FROM (
    SELECT t.feature_id, t.seq_id, max(a.act) AS max_act
    FROM {tmp} t LEFT JOIN activations a
      ON a.source_id = $source AND a.feature_id = t.feature_id AND a.seq_id = t.seq_id
     AND a.pos >= t.start_pos AND a.pos < t.end_pos
    WHERE t.kind = 'random'
    GROUP BY t.feature_id, t.seq_id
) m
WHERE t.kind = 'random' AND t.feature_id = m.feature_id AND t.seq_id = m.seq_id
"""


@dataclass
class SampleReport:
    """What one sampling call did."""

    sampled: list[int] = field(default_factory=list)  # features given new examples
    reused: list[int] = field(default_factory=list)  # features that already had examples
    dead: list[int] = field(default_factory=list)
    rare: list[int] = field(default_factory=list)
    n_windows: int = 0
    status_changed: int = 0  # features whose `status` or `skip_reason` this call changed

    @property
    def skipped(self) -> list[int]:
        return sorted(self.dead + self.rare)

    def merge(self, other: "SampleReport") -> None:
        self.sampled += other.sampled
        self.reused += other.reused
        self.dead += other.dead
        self.rare += other.rare
        self.n_windows += other.n_windows
        self.status_changed += other.status_changed


def _features_with_examples(con, source_id: str, feature_ids: list[int]) -> set[int]:
    rows = con.execute(
        "SELECT DISTINCT feature_id FROM examples WHERE source_id = $source "
        "AND feature_id IN (SELECT unnest($features::INTEGER[]))",
        {"source": source_id, "features": feature_ids},
    ).fetchall()
    return {int(r[0]) for r in rows}


def sample_examples(
    con,
    source_id: str,
    feature_ids: Iterable[int],
    cfg: SamplingConfig | None = None,
    *,
    resample: bool = False,
) -> SampleReport:
    """Sample the windows of a batch of features in one statement and write them to `examples`.

    Features that already have examples keep them (so a resumed run explains and scores the
    same windows as before) unless `resample`. Dead and rare features get `features.status` and
    `features.skip_reason`; features that got examples get status 'alive'. One transaction.
    """
    cfg = cfg or SamplingConfig()
    feats = sorted({int(f) for f in feature_ids})
    report = SampleReport()
    if not feats:
        return report
    if not resample:
        have = _features_with_examples(con, source_id, feats)
        report.reused = sorted(have)
        feats = [f for f in feats if f not in have]
        if not feats:
            return report

    tmp = "_fs_sample"
    params = _sample_params(source_id, feats, cfg)
    q_sql = _SAMPLE_SQL.format(tmp=tmp)
    stats_sql = _STATS_SQL.format(tmp=tmp)
    with transaction(con):
        con.execute(stats_sql, _used(stats_sql, params))
        con.execute(q_sql, _used(q_sql, params))
        if params["n_random"]:
            con.execute(_RANDOM_MAX_SQL.format(tmp=tmp), {"source": source_id})
        _classify(con, tmp, feats, cfg, report)
        if resample:
            con.execute(
                "DELETE FROM examples WHERE source_id = $source "
                "AND feature_id IN (SELECT unnest($features::INTEGER[]))",
                {"source": source_id, "features": feats},
            )
        report.n_windows = int(con.execute(
            f"""INSERT INTO examples (source_id, feature_id, seq_id, start_pos, end_pos, split, kind,
                                      rank, quantile, max_act)
                SELECT $source, feature_id, seq_id, start_pos, end_pos, split, kind, rank,
                       quantile, max_act
                FROM {tmp}
                WHERE seq_id IS NOT NULL AND n_seqs >= $min_active
                ORDER BY feature_id, kind, split, rank""",
            {"source": source_id, "min_active": cfg.min_active},
        ).fetchone()[0])
        report.status_changed = _mark_status(con, source_id, report, cfg)
        con.execute(f"DROP TABLE IF EXISTS {tmp}")
        con.execute(f"DROP TABLE IF EXISTS {tmp}_stats")
    return report


def _sample_params(source_id: str, feats: list[int], cfg: SamplingConfig) -> dict:
    """The sampling statement's parameters."""
    top_p, q_p, r_p = _patterns(cfg)
    n_top, n_random = len(top_p), len(r_p)
    # top candidates: a few more than needed, so that dropping duplicate windows leaves enough
    pool = n_top + max(8, n_top // 4) if cfg.dedupe else n_top
    return {
        "source": source_id, "features": feats, "fmin": feats[0], "fmax": feats[-1],
        "left": cfg.left, "w": cfg.window, "seed": cfg.seed, "dedupe": cfg.dedupe,
        "n_top": n_top, "top_pool": pool, "q_max": max(1, max(len(b) for b in q_p)),
        "nq": cfg.n_quantiles, "n_random": n_random,
        # entries read per feature for the top windows, and how many distinct sequences among
        # them make that read exact (else the feature's entries are grouped in full)
        "r_top": TOP_ENTRIES_PER_POOL * pool, "enough": max(pool, cfg.min_active),
        "q_sample": QUANTILE_SAMPLE,
        # enough candidates that excluding this feature's used sequences still leaves n_random
        "r_pool": n_random + pool + sum(len(b) for b in q_p),
        # per-bin counts, and the patterns padded so that DuckDB can type an empty one
        "q_counts": [len(b) for b in q_p],
        "top_pattern": top_p or ["explain"], "q_pattern": [b or ["explain"] for b in q_p],
        "r_pattern": r_p or ["explain"],
    }


def _classify(con, tmp: str, feats: list[int], cfg: SamplingConfig, report: SampleReport) -> None:
    """Each feature dead (no active sequence), rare (fewer than min_active) or sampled."""
    counts = con.execute(f"SELECT feature_id, any_value(n_seqs) FROM {tmp} GROUP BY feature_id").fetchall()
    n_seqs = {int(f): int(n) for f, n in counts}
    for f in feats:
        n = n_seqs.get(f, 0)
        if n == 0:
            report.dead.append(f)
        elif n < cfg.min_active:
            report.rare.append(f)
        else:
            report.sampled.append(f)


def _used(sql: str, params: dict) -> dict:
    """Only the named parameters the statement uses (DuckDB refuses unused ones)."""
    return {k: v for k, v in params.items() if f"${k}" in sql}


def _mark_status(con, source_id: str, report: SampleReport, cfg: SamplingConfig) -> int:
    """Write the features' status; only rows that change are updated: an updated row group of
    `features` is rewritten whole at the next checkpoint (every chunk of a label run, otherwise)."""
    rows = {"feature_id": [], "status": [], "skip_reason": []}
    for f in report.sampled:
        rows["feature_id"].append(f), rows["status"].append("alive"), rows["skip_reason"].append(None)
    for f in report.dead:
        rows["feature_id"].append(f), rows["status"].append("dead")
        rows["skip_reason"].append("no activations above the threshold")
    if report.rare:
        n = dict(con.execute(
            "SELECT feature_id, count(DISTINCT seq_id) FROM activations "
            "WHERE source_id = $source AND act > 0 AND feature_id IN (SELECT unnest($f::INTEGER[])) "
            "GROUP BY feature_id",
            {"source": source_id, "f": report.rare},
        ).fetchall())
        for f in report.rare:
            rows["feature_id"].append(f), rows["status"].append("rare")
            rows["skip_reason"].append(
                f"active in {int(n.get(f, 0))} sequences, fewer than the {cfg.min_active} needed")
    tbl = pa.table({
        "feature_id": pa.array(rows["feature_id"], pa.int32()),
        "status": pa.array(rows["status"], pa.string()),
        "skip_reason": pa.array(rows["skip_reason"], pa.string()),
    })
    con.register("_fs_status", tbl)
    try:
        return int(con.execute(
            "UPDATE features f SET status = s.status, skip_reason = s.skip_reason "
            "FROM _fs_status s WHERE f.source_id = $source AND f.feature_id = s.feature_id "
            "AND (f.status IS DISTINCT FROM s.status OR f.skip_reason IS DISTINCT FROM s.skip_reason)",
            {"source": source_id},
        ).fetchone()[0])
    finally:
        con.unregister("_fs_status")


# ---------------------------------------------------------------------------------------------
# reading examples back

_LOAD_SQL = """
WITH x AS (
    SELECT feature_id, seq_id, start_pos, end_pos, split, kind, rank, quantile
    FROM examples
    WHERE source_id = $source AND feature_id IN (SELECT unnest($features::INTEGER[]))
),
nz AS (
    SELECT x.feature_id, x.seq_id, x.start_pos,
           list(a.pos - x.start_pos ORDER BY a.pos) AS nz_pos, list(a.act ORDER BY a.pos) AS nz_act
    FROM x JOIN activations a
      ON a.source_id = $source AND a.feature_id = x.feature_id AND a.seq_id = x.seq_id
     AND a.pos >= x.start_pos AND a.pos < x.end_pos
    WHERE a.feature_id BETWEEN $fmin AND $fmax
    GROUP BY ALL
)
SELECT x.feature_id, x.seq_id, x.start_pos, x.end_pos, x.split, x.kind, x.rank, x.quantile,
       s.tokens[x.start_pos + 1 : x.end_pos] AS tokens,
       s.token_ids[x.start_pos + 1 : x.end_pos] AS token_ids,
       coalesce(nz.nz_pos, []) AS nz_pos, coalesce(nz.nz_act, []) AS nz_act
FROM x JOIN sequences s USING (seq_id)
LEFT JOIN nz USING (feature_id, seq_id, start_pos)
ORDER BY x.feature_id, CASE x.split WHEN 'explain' THEN 0 WHEN 'valid' THEN 1 ELSE 2 END,
         CASE x.kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END,
         x.quantile DESC NULLS LAST, x.rank, x.seq_id
"""


def arrow_table(rel) -> pa.Table:
    """A relation (`con.sql(...)`) as an Arrow table (DuckDB 1.x and 2.x spell it apart)."""
    fetch = getattr(rel, "to_arrow_table", None) or getattr(rel, "arrow")
    return fetch()


def load_examples(con, source_id: str, feature_ids: Iterable[int]) -> dict[int, FeatureExamples]:
    """The sampled windows of each feature (those with examples), tokens and raw activations.

    Each window's `acts` holds the feature's activation at every token (0 where `activations`
    has no row); `max_act` of a FeatureExamples is the feature's maximum from `features`.
    Windows come ordered by split, kind, and rank (quantile windows from the highest bin).
    """
    feats = sorted({int(f) for f in feature_ids})
    if not feats:
        return {}
    tbl = arrow_table(con.sql(_LOAD_SQL, params={"source": source_id, "features": feats,
                                                 "fmin": feats[0], "fmax": feats[-1]}))
    maxes = dict(con.execute(
        "SELECT feature_id, max_act FROM features WHERE source_id = $source "
        "AND feature_id IN (SELECT unnest($features::INTEGER[]))",
        {"source": source_id, "features": feats},
    ).fetchall())
    out: dict[int, FeatureExamples] = {}
    cols = tbl.to_pydict()
    for i in range(tbl.num_rows):
        f = int(cols["feature_id"][i])
        fe = out.get(f)
        if fe is None:
            m = maxes.get(f)
            fe = out[f] = FeatureExamples(source_id, f, float(m) if m is not None else 0.0)
        tokens = list(cols["tokens"][i])
        acts = np.zeros(len(tokens), dtype=np.float64)
        pos = cols["nz_pos"][i]
        if pos:
            acts[np.asarray(pos, dtype=np.int64)] = np.asarray(cols["nz_act"][i], dtype=np.float64)
        fe.windows.append(Window(
            seq_id=int(cols["seq_id"][i]), start_pos=int(cols["start_pos"][i]), tokens=tokens,
            acts=acts.tolist(), kind=cols["kind"][i], split=cols["split"][i],
            token_ids=[int(t) for t in cols["token_ids"][i]], quantile=cols["quantile"][i],
        ))
    for fe in out.values():  # a feature with no features row: its largest activation shown
        if fe.max_act <= 0:
            fe.max_act = max((w.max_act for w in fe.windows), default=0.0)
    return out
