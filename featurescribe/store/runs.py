"""SQL of the `runs` table: one row per flow run, beside Prefect's own record of it."""

from __future__ import annotations

import json
from typing import Any


def insert_run(con, run_id: str, flow: str, params: dict[str, Any],
               prefect_flow_run_id: str | None) -> None:
    con.execute(
        "INSERT INTO runs (run_id, flow, params, status, started_at, prefect_flow_run_id) "
        "VALUES (?, ?, ?, 'running', now()::TIMESTAMP, ?)",
        [run_id, flow, json.dumps(params, sort_keys=True, default=str), prefect_flow_run_id],
    )


def finish_run(con, run_id: str, status: str, error: str | None = None) -> None:
    con.execute(
        "UPDATE runs SET status = ?, finished_at = now()::TIMESTAMP, error = ? WHERE run_id = ?",
        [status, error, run_id],
    )


def mark_interrupted(con) -> int:
    """Rows still `running` whose process is gone become `interrupted`; returns how many."""
    n = con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0]
    if n:
        con.execute(
            "UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, now()::TIMESTAMP), "
            "error = coalesce(error, 'the process ended before the run finished') "
            "WHERE status = 'running'")
    return int(n)


def get_run(con, run_id: str) -> dict[str, Any] | None:
    cur = con.execute(
        "SELECT run_id, flow, params, status, started_at, finished_at, prefect_flow_run_id, error "
        "FROM runs WHERE run_id = ?", [run_id])
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([d[0] for d in cur.description], row))


def list_runs(con, flow: str | None = None) -> list[dict[str, Any]]:
    cur = con.execute(
        "SELECT run_id, flow, params, status, started_at, finished_at, prefect_flow_run_id, error "
        "FROM runs WHERE ? IS NULL OR flow = ? ORDER BY started_at, run_id", [flow, flow])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]
