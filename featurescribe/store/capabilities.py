"""`llm_capabilities`: what each OpenAI-compatible base URL + model was found to take."""

from __future__ import annotations


def read_capabilities(con, base_url: str, model: str) -> dict | None:
    row = con.execute(
        "SELECT structured, logprobs, dropped_params FROM llm_capabilities WHERE base_url = ? AND model = ?",
        [base_url, model]).fetchone()
    if row is None:
        return None
    return {"structured": row[0], "logprobs": bool(row[1]), "dropped_params": list(row[2] or [])}


def write_capabilities(con, base_url: str, model: str, record: dict) -> None:
    con.execute(
        "INSERT OR REPLACE INTO llm_capabilities (base_url, model, structured, logprobs, dropped_params, "
        "updated_at) VALUES (?, ?, ?, ?, ?, current_timestamp)",
        [base_url, model, record["structured"], bool(record["logprobs"]), list(record["dropped_params"])])
