"""SQL of the label pipeline: which features to label, why some are skipped, the logit-lens
tokens, and writing a computed chunk (explanations; scores through store/results.py)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Sequence

import pyarrow as pa

from featurescribe.errors import FeaturescribeError, UnknownSource
from featurescribe.records import Explanation
from featurescribe.store.bulk import insert_arrow


def source_width(con, source_id: str) -> int:
    row = con.execute("SELECT width FROM sources WHERE source_id = ?", [source_id]).fetchone()
    if row is None:
        known = [r[0] for r in con.execute("SELECT source_id FROM sources ORDER BY 1").fetchall()]
        hint = f" (sources in this database: {', '.join(known)})" if known else \
            " (the database has no sources: run featurescribe harvest first)"
        raise UnknownSource(f"no source {source_id!r}{hint}")
    return int(row[0])


def source_row(con, source_id: str) -> dict[str, Any]:
    cur = con.execute("SELECT * FROM sources WHERE source_id = ?", [source_id])
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def all_feature_ids(con, source_id: str) -> list[int]:
    return [r[0] for r in con.execute(
        "SELECT feature_id FROM features WHERE source_id = ? ORDER BY feature_id", [source_id]).fetchall()]


def alive_feature_ids(con, source_id: str) -> list[int]:
    return [r[0] for r in con.execute(
        "SELECT feature_id FROM features WHERE source_id = ? AND n_active > 0 "
        "AND coalesce(status, 'alive') NOT IN ('dead', 'rare') ORDER BY feature_id", [source_id]
    ).fetchall()]


def not_alive_counts(con, source_id: str) -> tuple[int, int, float]:
    """(dead features, rare features, the source's harvest threshold): why `alive` leaves them out."""
    dead, rare = con.execute(
        "SELECT count(*) FILTER (WHERE n_active = 0 OR status = 'dead'), "
        "count(*) FILTER (WHERE n_active > 0 AND status = 'rare') FROM features WHERE source_id = ?",
        [source_id]).fetchone()
    threshold = con.execute("SELECT threshold FROM sources WHERE source_id = ?", [source_id]).fetchone()[0]
    return int(dead), int(rare), float(threshold)


def labelled_feature_ids(con, source_id: str, explainer: str) -> set[int]:
    """Features with a chosen, ok explanation by `explainer` that has a score."""
    return {r[0] for r in con.execute(
        """SELECT DISTINCT e.feature_id FROM explanations e
           WHERE e.source_id = $source AND e.explainer = $explainer AND e.chosen
             AND coalesce(e.status, 'ok') = 'ok'
             AND EXISTS (SELECT 1 FROM scores s WHERE s.explanation_id = e.explanation_id)""",
        {"source": source_id, "explainer": explainer},
    ).fetchall()}


def skip_reasons(con, source_id: str, feature_ids: Sequence[int]) -> dict[int, str | None]:
    return dict(con.execute(
        "SELECT feature_id, skip_reason FROM features WHERE source_id = $source "
        "AND feature_id IN (SELECT unnest($f::INTEGER[]))",
        {"source": source_id, "f": list(feature_ids)},
    ).fetchall())


def stored_promoted_tokens(con, source_id: str, feature_ids: Sequence[int], k: int) -> dict[int, list[str]]:
    """`features.promoted_tokens` of the features that have at least k stored."""
    return dict(con.execute(
        "SELECT feature_id, promoted_tokens FROM features WHERE source_id = $s AND "
        "feature_id IN (SELECT unnest($f::INTEGER[])) AND len(promoted_tokens) >= $k",
        {"s": source_id, "f": sorted(feature_ids), "k": k}).fetchall())


def save_promoted_tokens(con, source_id: str, tokens: dict[int, list[str]]) -> None:
    lens = pa.table({"feature_id": pa.array(list(tokens), pa.int32()),  # noqa: F841 (read by the SQL)
                     "tokens": pa.array(list(tokens.values()), pa.list_(pa.string()))})
    con.execute("UPDATE features f SET promoted_tokens = t.tokens FROM lens t "
                "WHERE f.source_id = ? AND f.feature_id = t.feature_id", [source_id])


def save_intruder_gate(con, source_id: str, accuracy: dict[int, float], gated: dict[int, str]) -> None:
    """The intruder gate's accuracy per feature (`features.intruder`); the gated ones get status
    'gated' and the reason, the others that passed go back to 'alive'."""
    if not accuracy:
        return
    ids = sorted(accuracy)
    con.execute(
        "UPDATE features f SET intruder = g.acc, "
        "status = CASE WHEN g.reason IS NULL THEN 'alive' ELSE 'gated' END, skip_reason = g.reason "
        "FROM (SELECT unnest($f::INTEGER[]) AS feature_id, unnest($a::DOUBLE[]) AS acc, "
        "             unnest($r::VARCHAR[]) AS reason) g "
        "WHERE f.source_id = $s AND f.feature_id = g.feature_id",
        {"s": source_id, "f": ids, "a": [float(accuracy[i]) for i in ids], "r": [gated.get(i) for i in ids]},
    )


def unchoose_older(con, source_id: str, chosen: Sequence[Explanation]) -> None:
    """Older explanations by the same explainer and method of these features: not chosen."""
    if not chosen:
        return
    keys = pa.table({
        "feature_id": pa.array([e.feature_id for e in chosen], pa.int32()),
        "explainer": pa.array([e.explainer for e in chosen], pa.string()),
        "method": pa.array([e.method for e in chosen], pa.string()),
    })
    view = f"_chosen_{uuid.uuid4().hex}"
    con.register(view, keys)
    try:
        con.execute(
            f"UPDATE explanations e SET chosen = false FROM {view} k "
            "WHERE e.source_id = ? AND e.feature_id = k.feature_id "
            "AND e.explainer = k.explainer AND e.method = k.method AND e.chosen",
            [source_id])
    finally:
        con.unregister(view)


def insert_explanations(con, rows: Sequence[Any], run_id: str | None) -> int:
    """Rows with `.explanation` (an Explanation), `.chosen`, `.status` and `.error`."""
    if not rows:
        return 0
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    exps = [r.explanation for r in rows]
    return insert_arrow(con, "explanations", pa.table({
        "explanation_id": pa.array([e.explanation_id for e in exps], pa.string()),
        "source_id": pa.array([e.source_id for e in exps], pa.string()),
        "feature_id": pa.array([e.feature_id for e in exps], pa.int32()),
        "text": pa.array([e.text for e in exps], pa.string()),
        "explainer": pa.array([e.explainer for e in exps], pa.string()),
        "method": pa.array([e.method for e in exps], pa.string()),
        "run_id": pa.array([e.run_id or run_id for e in exps], pa.string()),
        "created_at": pa.array([now] * len(rows), pa.timestamp("us")),
        "candidate": pa.array([e.candidate for e in exps], pa.int32()),
        "chosen": pa.array([r.chosen for r in rows], pa.bool_()),
        "status": pa.array([r.status for r in rows], pa.string()),
        "error": pa.array([r.error for r in rows], pa.string()),
    }))
