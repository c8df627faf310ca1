"""SQL of the `runs` table: one row per flow run, beside Prefect's own record of it."""

from __future__ import annotations

import json
from typing import Any


def insert_run(con, run_id: str, flow: str, params: dict[str, Any],
               prefect_flow_run_id: str | None, host: str | None = None, pid: int | None = None) -> None:
    con.execute(
        "INSERT INTO runs (run_id, flow, params, status, started_at, prefect_flow_run_id, host, pid) "
        "VALUES (?, ?, ?, 'running', now()::TIMESTAMP, ?, ?, ?)",
        [run_id, flow, json.dumps(params, sort_keys=True, default=str), prefect_flow_run_id, host, pid],
    )


def finish_run(con, run_id: str, status: str, error: str | None = None) -> None:
    con.execute(
        "UPDATE runs SET status = ?, finished_at = now()::TIMESTAMP, error = ? WHERE run_id = ?",
        [status, error, run_id],
    )


def running_processes(con) -> list[tuple[str, str | None, int | None]]:
    """(run_id, host, pid) of the rows still `running`."""
    return con.execute("SELECT run_id, host, pid FROM runs WHERE status = 'running'").fetchall()


def mark_interrupted(con, run_ids: list[str]) -> int:
    """These `running` rows (whose process is gone) become `interrupted`; returns how many."""
    if run_ids:
        con.execute(
            "UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, now()::TIMESTAMP), "
            "error = coalesce(error, 'the process ended before the run finished') "
            "WHERE status = 'running' AND run_id IN (SELECT unnest(?::VARCHAR[]))", [list(run_ids)])
    return len(run_ids)


def list_runs(con, flow: str | None = None) -> list[dict[str, Any]]:
    cur = con.execute(
        "SELECT run_id, flow, params, status, started_at, finished_at, prefect_flow_run_id, error "
        "FROM runs WHERE ? IS NULL OR flow = ? ORDER BY started_at, run_id", [flow, flow])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def resume_cache_entries(con, source_id: str, limit: int) -> dict[str, dict]:
    """Cached answers of the last calls of unfinished label runs of `source_id` (interrupted,
    failed or cancelled): what a resumed run's chunks may find already answered. The `limit`
    most recent ones, {cache_key: response}."""
    rows = con.execute(
        """
        SELECT c.cache_key, c.response
        FROM llm_calls l
        JOIN runs r ON r.run_id = l.run_id
        JOIN llm_cache c ON c.cache_key = l.prompt_hash
        WHERE r.flow = 'label' AND r.status IN ('interrupted', 'failed', 'cancelled')
          AND json_extract_string(r.params, '$.source_id') = $source
          AND l.status = 'ok'
        QUALIFY row_number() OVER (PARTITION BY c.cache_key ORDER BY l.created_at DESC) = 1
        ORDER BY l.created_at DESC
        LIMIT $limit
        """, {"source": source_id, "limit": int(limit)}).fetchall()
    return {k: (json.loads(v) if isinstance(v, str) else v) for k, v in rows}


def label_run_totals(con, run_id: str) -> dict[str, Any]:
    """What a label run spent and scored: spend, LLM calls (cached ones), mean test score."""
    spent, n_calls, n_cached = con.execute(
        "SELECT coalesce(sum(cost_usd), 0), count(*), count(*) FILTER (WHERE status = 'cached') "
        "FROM llm_calls WHERE run_id = ?", [run_id]).fetchone()
    (mean,) = con.execute(
        "SELECT avg(s.value) FROM scores s JOIN explanations e USING (explanation_id) "
        "WHERE s.run_id = ? AND s.scorer = 'simulation' AND s.split = 'test' AND e.chosen",
        [run_id]).fetchone()
    return {"spent_usd": float(spent), "llm_calls": int(n_calls), "cached_calls": int(n_cached),
            "mean_score": None if mean is None else float(mean)}


def run_spend(con, run_id: str) -> float:
    """What the ledger rows of a run cost."""
    return float(con.execute("SELECT coalesce(sum(cost_usd), 0) FROM llm_calls WHERE run_id = ?",
                             [run_id]).fetchone()[0])
