"""Per-feature activation moments and quantile boundaries, streamed in feature order (the OpenAI
neuron-explainer export's `mean`, `variance`, `skewness`, `kurtosis`, `quantile_boundaries`).

Moments are over every harvested token of the source (`sources.n_tokens`), a token whose entry was
not stored (below the source's threshold) counting as 0; without `n_tokens` (a database built
by hand) over the stored entries. Kurtosis is the excess kurtosis (0 for a normal distribution).
Quantile boundaries are the 25th, 50th and 75th percentiles of the feature's per-sequence peaks:
the edges of the 4 bins the quantile windows are drawn from.
"""

from __future__ import annotations

import math

MOMENTS_SQL = """
WITH src AS (SELECT coalesce(n_tokens, 0) AS n_tokens FROM sources WHERE source_id = $source),
m AS (SELECT feature_id, count(*) AS n, sum(act) AS s1, sum(act * act) AS s2,
             sum(pow(act, 3)) AS s3, sum(pow(act, 4)) AS s4
      FROM activations WHERE source_id = $source GROUP BY feature_id),
q AS (SELECT feature_id, quantile_cont(peak, [0.25, 0.5, 0.75]) AS bounds
      FROM (SELECT feature_id, seq_id, max(act) AS peak FROM activations
            WHERE source_id = $source GROUP BY feature_id, seq_id)
      GROUP BY feature_id)
SELECT m.feature_id, greatest(src.n_tokens, m.n) AS n, m.s1, m.s2, m.s3, m.s4, q.bounds
FROM m JOIN q USING (feature_id) CROSS JOIN src
ORDER BY m.feature_id
"""


def moments(row: dict) -> dict:
    """mean, variance, skewness, kurtosis (excess) and quantile_boundaries from a row's sums."""
    n = float(row["n"])
    mean = row["s1"] / n
    e2, e3, e4 = row["s2"] / n, row["s3"] / n, row["s4"] / n
    var = max(e2 - mean * mean, 0.0)
    out = {"mean": mean, "variance": var, "skewness": None, "kurtosis": None,
           "quantile_boundaries": [float(b) for b in row["bounds"]] if row["bounds"] else None}
    if var > 0:
        m3 = e3 - 3 * mean * e2 + 2 * mean ** 3
        m4 = e4 - 4 * mean * e3 + 6 * mean ** 2 * e2 - 3 * mean ** 4
        out["skewness"] = m3 / var ** 1.5
        out["kurtosis"] = m4 / var ** 2 - 3.0
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out.items()}
