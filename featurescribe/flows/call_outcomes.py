"""The end of a `label` run's summary: what became of its LLM calls, by kind.

Every attempt in the ledger is counted under one kind of llm/outcomes.py, in groups: answers
used, the model's own failures (answers without the asked-for form), the server's refusals
(request rejected, HTTP errors), no answer (timeouts, connection errors), not sent (budget).
The counts are kept with the run (`runs.call_outcomes`, JSON `{group: {kind: attempts}}`) and
printed after the summary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from featurescribe.llm.outcomes import GROUP_TITLES, GROUPS, KINDS, OTHER

ALWAYS_SHOWN = ("used", "model_failure", "server_refusal")


@dataclass(frozen=True)
class CallOutcomes:
    counts: dict[str, int]  # kind -> attempts

    def group(self, name: str) -> dict[str, int]:
        return {k: n for k, n in self.counts.items() if _group_of(k) == name}

    def total(self, group: str) -> int:
        return sum(self.group(group).values())

    def as_record(self) -> dict[str, dict[str, int]]:
        """What `runs.call_outcomes` holds: every group, with its kinds' counts."""
        return {g: self.group(g) for g in GROUPS}


def _group_of(kind: str) -> str:
    return KINDS[kind].group if kind in KINDS else KINDS[OTHER].group


def record_call_outcomes(db, run_id: str) -> CallOutcomes:
    """Count the run's ledger rows by kind and keep the counts in its `runs` row (`db`: a path
    or a `store.connection.Database`). The label flow, the batch phases and `label` call it."""
    from featurescribe.store.call_outcomes import count_call_outcomes, save_call_outcomes
    from featurescribe.store.connection import open_db, session

    with (session(db) if not isinstance(db, str) else open_db(db, create=False)) as con:
        outcomes = CallOutcomes(count_call_outcomes(con, run_id))
        save_call_outcomes(con, run_id, outcomes.as_record())
        return outcomes


def print_call_outcomes(outcomes: CallOutcomes, out=None) -> None:
    """The groups as lines: a total, then its kinds (nothing when the run made no LLM call)."""
    out = out or sys.stdout
    if not outcomes.counts:
        return
    print("LLM attempts by outcome", file=out)
    width = max(len(t) for t in GROUP_TITLES.values())
    for g in GROUPS:
        kinds = outcomes.group(g)
        if not kinds and g not in ALWAYS_SHOWN:
            continue
        detail = ", ".join(f"{KINDS[k].title if k in KINDS else k} {n}"
                           for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        print(f"  {GROUP_TITLES[g].ljust(width)}  {outcomes.total(g):>6}" + (f"  [{detail}]" if detail else ""),
              file=out)
