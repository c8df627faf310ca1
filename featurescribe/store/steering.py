"""SQL of steering: the source a feature belongs to, output effects, intervention audit rows.

- `source_row(con, source_id)`: the `sources` row as a dict (a clear error naming the sources
  there are when it is missing).
- `feature_max_act(con, source_id, feature_id)`: the feature's max activation (None when it never
  fired); an id the source does not have is an error.
- `save_output_effects` / `load_output_effects`: `features.output_rising`, `.output_falling`,
  `.output_effects` (JSON: strength, KL, the probability changes).
- `save_interventions(con, results, run_id)`: the intervention scorer's rows in `interventions`,
  in the caller's transaction (earlier rows of the same explanation, judge and split replaced).
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import pyarrow as pa

from featurescribe.errors import FeaturescribeError, UnknownSource
from featurescribe.store.bulk import insert_arrow


def source_row(con, source_id: str) -> dict:
    cur = con.execute("SELECT * FROM sources WHERE source_id = ?", [source_id])
    row = cur.fetchone()
    if row is None:
        known = [r[0] for r in con.execute("SELECT source_id FROM sources ORDER BY 1").fetchall()]
        hint = f" (sources in this database: {', '.join(known)})" if known else \
            " (the database has no sources: run featurescribe harvest first)"
        raise UnknownSource(f"no source {source_id!r}{hint}")
    return dict(zip([d[0] for d in cur.description], row))


def feature_max_act(con, source: dict, feature_id: int) -> float | None:
    width = int(source["width"])
    if not 0 <= feature_id < width:
        raise FeaturescribeError(f"feature {feature_id} is outside source {source['source_id']!r}, "
                                 f"which has features 0 to {width - 1}")
    row = con.execute("SELECT max_act FROM features WHERE source_id = ? AND feature_id = ?",
                      [source["source_id"], feature_id]).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def save_output_effects(con, source_id: str, effects: dict) -> None:
    """{feature_id: OutputEffects} into `features` (rows must exist: harvest made them)."""
    if not effects:
        return
    effects_tbl = pa.table({  # noqa: F841 (read by the SQL below)
        "feature_id": pa.array([int(f) for f in effects], pa.int32()),
        "rising": pa.array([e.rising for e in effects.values()], pa.list_(pa.string())),
        "falling": pa.array([e.falling for e in effects.values()], pa.list_(pa.string())),
        "info": pa.array([json.dumps(e.as_dict()) for e in effects.values()], pa.string()),
    })
    con.execute("UPDATE features f SET output_rising = t.rising, output_falling = t.falling, "
                "output_effects = t.info::JSON FROM effects_tbl t "
                "WHERE f.source_id = ? AND f.feature_id = t.feature_id", [source_id])


def load_output_effects(con, source_id: str, feature_ids: Sequence[int], k: int) -> dict[int, tuple]:
    """{feature: (rising, falling)} of the features that have at least k of each stored."""
    rows = con.execute(
        "SELECT feature_id, output_rising, output_falling FROM features WHERE source_id = $s "
        "AND feature_id IN (SELECT unnest($f::INTEGER[])) AND len(output_rising) >= $k "
        "AND len(output_falling) >= $k",
        {"s": source_id, "f": [int(f) for f in feature_ids], "k": k}).fetchall()
    return {int(f): (list(r)[:k], list(d)[:k]) for f, r, d in rows}


_AUDIT_COLUMNS = {
    "prompt_index": pa.int32(), "prompt": pa.string(), "strength": pa.float64(), "kl": pa.float64(),
    "steered": pa.string(), "unsteered": pa.string(), "steered_first": pa.bool_(),
    "picked": pa.string(), "correct": pa.float64(), "role": pa.string(),
}


def save_interventions(con, results: Iterable, run_id: str | None = None) -> int:
    """The audit rows of intervention ScoreResults (`result.interventions`); returns how many."""
    results = [r for r in results if getattr(r, "interventions", None)]
    if not results:
        return 0
    sep = "\x1f"
    keys = sorted({sep.join((r.explanation_id, r.simulator or "", r.split or "")) for r in results})
    con.execute("DELETE FROM interventions WHERE concat_ws(?, explanation_id, judge, split) "
                "IN (SELECT unnest(?::VARCHAR[]))", [sep, keys])
    pairs = [(r, rec) for r in results for rec in r.interventions]
    cols = {
        "explanation_id": pa.array([r.explanation_id for r, _ in pairs], pa.string()),
        "judge": pa.array([r.simulator or "" for r, _ in pairs], pa.string()),
        "split": pa.array([r.split or "test" for r, _ in pairs], pa.string()),
        "run_id": pa.array([run_id] * len(pairs), pa.string()),
    }
    for name, typ in _AUDIT_COLUMNS.items():
        cols[name] = pa.array([getattr(rec, name) for _, rec in pairs], typ)
    return insert_arrow(con, "interventions", pa.table(cols))
