"""SQL of provider batches (OpenAI Batch, Anthropic Message Batches): `llm_batches`, one row per
batch, and `llm_batch_items`, one row per request in a batch.

A batch and its items are written in one transaction the moment the provider gives the batch its
id, so a run that stops (or a `label --batch --no-wait`) leaves behind what a later run needs to
pick the batch up instead of submitting its requests again.

`llm_batches.status` is ours: 'submitted' (created, not polled yet), 'in_progress', 'ended' (the
provider finished; results not stored yet), then 'collected' (every result is in the response
cache and the ledger). The first three are open. `payload` (JSON) holds the backend spec, the
model, the provider's last status and request counts, and the output/error file ids.

`llm_batch_items.custom_id` is the request's response-cache key; `status` is 'pending' until the
batch is collected, then 'succeeded', 'errored', 'expired', 'canceled' or 'missing'.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable

import pyarrow as pa

from featurescribe.store.bulk import insert_arrow
from featurescribe.store.transaction import transaction

OPEN_STATUSES = ("submitted", "in_progress", "ended")
_COLUMNS = ("batch_id", "provider", "run_id", "purpose", "status", "n_requests", "input_file_id",
            "payload", "created_at", "finished_at")


def _in_transaction(con, fn) -> None:
    with transaction(con):
        fn()


def insert_batch(con, *, batch_id: str, provider: str, run_id: str | None, purpose: str | None,
                 input_file_id: str | None, payload: dict[str, Any],
                 items: list[tuple[str, str | None, bool, bool]]) -> None:
    """Record a batch the provider just created and its items, committed at once.

    An item is (custom_id, purpose, structured, wrapped): `structured` when the request asked
    for a JSON schema, `wrapped` when the schema was wrapped in {"value": ...} (Anthropic).
    """

    def write():
        con.execute(
            "INSERT INTO llm_batches (batch_id, provider, run_id, purpose, status, n_requests, "
            "input_file_id, payload, created_at) VALUES (?, ?, ?, ?, 'submitted', ?, ?, ?, "
            "now()::TIMESTAMP)",
            [batch_id, provider, run_id, purpose, len(items), input_file_id, json.dumps(payload)],
        )
        insert_arrow(con, "llm_batch_items", pa.table({
            "batch_id": pa.array([batch_id] * len(items), pa.string()),
            "custom_id": pa.array([i[0] for i in items], pa.string()),
            "purpose": pa.array([i[1] for i in items], pa.string()),
            "structured": pa.array([bool(i[2]) for i in items], pa.bool_()),
            "wrapped": pa.array([bool(i[3]) for i in items], pa.bool_()),
            "status": pa.array(["pending"] * len(items), pa.string()),
        }))

    _in_transaction(con, write)


def update_batch(con, batch_id: str, *, status: str | None = None,
                 payload_update: dict[str, Any] | None = None) -> None:
    """Change a batch's status and/or merge keys into its payload; 'collected' stamps finished_at."""
    if payload_update:
        row = con.execute("SELECT payload FROM llm_batches WHERE batch_id = ?", [batch_id]).fetchone()
        payload = _load(row[0]) if row else {}
        payload.update(payload_update)
        con.execute("UPDATE llm_batches SET payload = ? WHERE batch_id = ?",
                    [json.dumps(payload), batch_id])
    if status is not None:
        con.execute(
            "UPDATE llm_batches SET status = ?, finished_at = CASE WHEN ? = 'collected' "
            "THEN now()::TIMESTAMP ELSE finished_at END WHERE batch_id = ?",
            [status, status, batch_id],
        )


def finish_batch(con, batch_id: str, results: Iterable[tuple[str, str, str | None]],
                 payload_update: dict[str, Any] | None = None) -> None:
    """Store every item's outcome (custom_id, status, error) and mark the batch 'collected'.

    Items the results do not name become 'missing'. One transaction: a batch is collected
    completely or not at all.
    """
    results = list(results)

    def write():
        if results:
            view = f"_items_{uuid.uuid4().hex}"
            con.register(view, pa.table({
                "custom_id": pa.array([r[0] for r in results], pa.string()),
                "status": pa.array([r[1] for r in results], pa.string()),
                "error": pa.array([r[2] for r in results], pa.string()),
            }))
            try:
                con.execute(
                    f"UPDATE llm_batch_items SET status = v.status, error = v.error FROM {view} v "
                    "WHERE llm_batch_items.batch_id = ? AND llm_batch_items.custom_id = v.custom_id",
                    [batch_id])
            finally:
                con.unregister(view)
        con.execute("UPDATE llm_batch_items SET status = 'missing', error = 'no result for this "
                    "request' WHERE batch_id = ? AND status = 'pending'", [batch_id])
        update_batch(con, batch_id, status="collected", payload_update=payload_update)

    _in_transaction(con, write)


def open_batches(con, provider: str | None = None) -> list[dict[str, Any]]:
    """Batches not yet collected, oldest first."""
    marks = ", ".join("?" for _ in OPEN_STATUSES)
    return _select(con, f"WHERE status IN ({marks}) AND (? IS NULL OR provider = ?) "
                        "ORDER BY created_at, batch_id", [*OPEN_STATUSES, provider, provider])


def list_batches(con, run_id: str | None = None) -> list[dict[str, Any]]:
    return _select(con, "WHERE ? IS NULL OR run_id = ? ORDER BY created_at, batch_id",
                   [run_id, run_id])


def batch_items(con, batch_id: str) -> list[dict[str, Any]]:
    cur = con.execute("SELECT custom_id, purpose, status, error FROM llm_batch_items "
                      "WHERE batch_id = ? ORDER BY custom_id", [batch_id])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def item_info(con, batch_id: str) -> dict[str, tuple[str | None, bool, bool, int]]:
    """{custom_id: (purpose, structured, wrapped, attempt)} of a batch's items; `attempt` counts
    this batch and every earlier one the request was in."""
    rows = con.execute(
        "WITH mine AS (SELECT custom_id, purpose, structured, wrapped FROM llm_batch_items "
        "              WHERE batch_id = ?) "
        "SELECT m.custom_id, m.purpose, coalesce(m.structured, false), coalesce(m.wrapped, false), "
        "       count(*) "
        "FROM mine m JOIN llm_batch_items j USING (custom_id) JOIN llm_batches b USING (batch_id) "
        "WHERE b.created_at <= (SELECT created_at FROM llm_batches WHERE batch_id = ?) "
        "GROUP BY ALL", [batch_id, batch_id]).fetchall()
    return {r[0]: (r[1], bool(r[2]), bool(r[3]), int(r[4])) for r in rows}


def classify_items(con, custom_ids: list[str]) -> dict[str, tuple[bool, int]]:
    """For each custom_id ever submitted: (is it in an open batch, how many batches tried it)."""
    if not custom_ids:
        return {}
    view = f"_keys_{uuid.uuid4().hex}"
    con.register(view, pa.table({"custom_id": pa.array(custom_ids, pa.string())}))
    try:
        marks = ", ".join("?" for _ in OPEN_STATUSES)
        rows = con.execute(
            f"SELECT i.custom_id, bool_or(b.status IN ({marks})), count(*) "
            f"FROM llm_batch_items i JOIN {view} k USING (custom_id) "
            "JOIN llm_batches b USING (batch_id) GROUP BY i.custom_id",
            list(OPEN_STATUSES)).fetchall()
    finally:
        con.unregister(view)
    return {cid: (bool(is_open), int(n)) for cid, is_open, n in rows}


def _select(con, where: str, args: list) -> list[dict[str, Any]]:
    cur = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM llm_batches {where}", args)
    out = []
    for row in cur.fetchall():
        d = dict(zip(_COLUMNS, row))
        d["payload"] = _load(d["payload"])
        out.append(d)
    return out


def _load(value) -> dict[str, Any]:
    if value is None:
        return {}
    return json.loads(value) if isinstance(value, str) else dict(value)
