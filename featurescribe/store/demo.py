"""Reads of `featurescribe demo`: which features to show, and their labels with every judge."""

from __future__ import annotations

from typing import Any


def demo_features(con, source_id: str, n: int, min_active: int = 40) -> list[int]:
    """`n` features worth a first look: active often enough to sample (`min_active` entries),
    the peakiest first (highest max / mean activation: they fire strongly on a few tokens)."""
    rows = con.execute(
        """SELECT feature_id FROM features
           WHERE source_id = ? AND n_active >= ? AND coalesce(status, 'ok') NOT IN ('dead', 'rare')
           ORDER BY max_act / nullif(mean_act, 0) DESC NULLS LAST, feature_id
           LIMIT ?""", [source_id, int(min_active), int(n)]).fetchall()
    return sorted(int(r[0]) for r in rows)


def demo_labels(con, source_id: str, feature_ids: list[int]) -> list[dict[str, Any]]:
    """Every chosen explanation of these features with its test simulation score, its shuffled
    baseline and lift, and who explained and simulated; by feature, best score first."""
    cur = con.execute(
        """SELECT e.feature_id, e.text AS explanation, e.explainer, s.simulator, s.value AS score,
                  s.baseline_shuffled,
                  s.value - coalesce(s.baseline_shuffled, s.baseline_population) AS lift
           FROM explanations e JOIN scores s USING (explanation_id)
           WHERE e.source_id = $source AND e.feature_id IN (SELECT unnest($f::INTEGER[]))
             AND e.chosen AND coalesce(e.status, 'ok') = 'ok'
             AND s.scorer = 'simulation' AND coalesce(s.split, 'test') = 'test'
           ORDER BY e.feature_id, s.value DESC, e.explainer""",
        {"source": source_id, "f": list(feature_ids)})
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]
