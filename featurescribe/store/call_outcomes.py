"""SQL of a run's call outcomes: its `llm_calls` rows counted by kind (llm/outcomes.py), and
the counts kept with the run (`runs.call_outcomes`)."""

from __future__ import annotations

import json

from featurescribe.llm.outcomes import OTHER, OUTCOMES


def _kind_case() -> tuple[str, list[str]]:
    """A CASE expression giving each ledger row its kind, and its parameters."""
    whens, args = [], []
    for kind in OUTCOMES:
        cond, cond_args = "status = ?", [str(kind.status)]
        if kind.error is not None:
            cond += " AND regexp_matches(coalesce(error, ''), ?)"
            cond_args.append(f"^(?:{kind.error})")
        whens.append(f"WHEN {cond} THEN ?")
        args += [*cond_args, kind.name]
    return f"CASE {' '.join(whens)} ELSE ? END", [*args, OTHER]


def count_call_outcomes(con, run_id: str) -> dict[str, int]:
    """{kind: attempts} for the ledger rows of `run_id` (kinds with none left out)."""
    case, args = _kind_case()
    rows = con.execute(f"SELECT {case} AS kind, count(*) FROM llm_calls WHERE run_id = ? GROUP BY kind",
                       [*args, run_id]).fetchall()
    return {kind: int(n) for kind, n in rows}


def save_call_outcomes(con, run_id: str, outcomes: dict) -> None:
    con.execute("UPDATE runs SET call_outcomes = ? WHERE run_id = ?", [json.dumps(outcomes), run_id])


def read_call_outcomes(con, run_id: str) -> dict | None:
    row = con.execute("SELECT call_outcomes FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None or row[0] is None:
        return None
    return json.loads(row[0]) if isinstance(row[0], str) else row[0]
