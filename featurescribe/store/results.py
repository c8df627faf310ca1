"""Writing scores and simulations (`scores`, `simulations`), in the caller's transaction.

`save_scores(con, results)` replaces any earlier row of the same explanation, scorer, simulator
and split (so re-scoring does not duplicate), then inserts every result's row into `scores` and
every window of its `simulations` into `simulations`, both as Arrow tables.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Iterable

import pyarrow as pa

from featurescribe.records import ScoreResult
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.steering import save_interventions


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def save_scores(con, results: Iterable[ScoreResult], run_id: str | None = None) -> int:
    """Insert the results (and their simulations); returns the number of score rows written.

    Runs no BEGIN/COMMIT: the caller's transaction decides. A non-finite score is refused.
    """
    results = list(results)
    if not results:
        return 0
    for r in results:
        if not math.isfinite(float(r.value)):
            raise ValueError(f"score of {r.explanation_id} ({r.scorer}) is not finite: {r.value}")

    # earlier rows of the same (explanation, scorer, simulator, split) are replaced; parameters,
    # not a registered view, so a caller's half-read result on `con` does not get in the way
    sep = "\x1f"
    keys = sorted({sep.join((r.explanation_id, r.scorer, r.simulator or "", r.split or "")) for r in results})
    sim_keys = sorted({sep.join((r.explanation_id, r.simulator or "", r.split or ""))
                       for r in results if r.scorer == "simulation"})
    # the explanation ids first: the key is then built for their rows only, not the whole table's
    ids = sorted({r.explanation_id for r in results})
    con.execute(
        "DELETE FROM scores WHERE explanation_id IN (SELECT unnest(?::VARCHAR[])) AND concat_ws(?, explanation_id, "
        "scorer, coalesce(simulator, ''), coalesce(split, '')) IN (SELECT unnest(?::VARCHAR[]))", [ids, sep, keys])
    if sim_keys:
        con.execute(
            "DELETE FROM simulations WHERE explanation_id IN (SELECT unnest(?::VARCHAR[])) "
            "AND concat_ws(?, explanation_id, simulator, split) IN (SELECT unnest(?::VARCHAR[]))",
            [ids, sep, sim_keys])

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    insert_arrow(con, "scores", pa.table({
        "explanation_id": pa.array([r.explanation_id for r in results], pa.string()),
        "scorer": pa.array([r.scorer for r in results], pa.string()),
        "value": pa.array([float(r.value) for r in results], pa.float64()),
        "simulator": pa.array([r.simulator for r in results], pa.string()),
        "n_examples": pa.array([int(r.n_examples) for r in results], pa.int32()),
        "details": pa.array([json.dumps(r.details, allow_nan=False, default=str) for r in results], pa.string()),
        "split": pa.array([r.split for r in results], pa.string()),
        "baseline_shuffled": pa.array([_finite(r.baseline_shuffled) for r in results], pa.float64()),
        "baseline_tokens": pa.array([_finite(r.baseline_tokens) for r in results], pa.float64()),
        "baseline_population": pa.array([_finite(r.baseline_population) for r in results], pa.float64()),
        "run_id": pa.array([run_id] * len(results), pa.string()),
        "created_at": pa.array([now] * len(results), pa.timestamp("us")),
    }))

    sims = [(r, s) for r in results for s in r.simulations]
    if sims:
        insert_arrow(con, "simulations", pa.table({
            "explanation_id": pa.array([r.explanation_id for r, _ in sims], pa.string()),
            "simulator": pa.array([r.simulator or "" for r, _ in sims], pa.string()),
            "seq_id": pa.array([s.seq_id for _, s in sims], pa.int64()),
            "start_pos": pa.array([s.start_pos for _, s in sims], pa.int32()),
            "split": pa.array([s.split for _, s in sims], pa.string()),
            "true_acts": pa.array([s.true_acts for _, s in sims], pa.list_(pa.float32())),
            "predicted": pa.array([s.predicted for _, s in sims], pa.list_(pa.float32())),
            "kind": pa.array([s.kind for _, s in sims], pa.string()),
            "run_id": pa.array([run_id] * len(sims), pa.string()),
        }))
    save_interventions(con, results, run_id)
    return len(results)
