"""`featurescribe label`: sample, explain and score the features of a source.

    featurescribe label --db PATH --source SOURCE_ID [--features SPEC] [--explainer BACKEND]
                        [--simulator BACKEND] [--scorers simulation,detection,fuzzing]
                        [--candidates N] [--concurrency N] [--budget-usd X] [--no-cache]
                        [--method pairs|highlighted] [--chunk-size N]

The options are the fields of `LabelOptions` (flows/label_options.py). It ends with a summary:
features labelled, skipped (dead or rare, with the reason), failed, the spend, and whether the
run stopped at the budget, then the run's LLM attempts by outcome (flows/call_outcomes.py); the exit
status says whether features failed (statuses.ExitStatus).
"""

from __future__ import annotations

import argparse
import sys

from featurescribe.flows import label_options
from featurescribe.flows.call_outcomes import print_call_outcomes, record_call_outcomes
from featurescribe.flows.label_run import LabelSummary
from featurescribe.statuses import ExitStatus, FeatureStatus
from featurescribe.store.connection import DEFAULT_DB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    label_options.add_arguments(p)


def _ids(ids) -> str:
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:12])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")


def print_summary(s: LabelSummary, out=None) -> None:
    out = out or sys.stdout
    dead = [k for k in s.skipped if k.status == FeatureStatus.DEAD]
    rare = [k for k in s.skipped if k.status == FeatureStatus.RARE]
    gated = [k.feature_id for k in s.skipped if k.status == FeatureStatus.GATED]
    rows = [
        ("run", s.run_id),
        ("source", s.source_id),
        ("explainer / simulator", f"{s.explainer} / {s.simulator}"),
        ("features selected", f"{s.n_selected}"),
        ("already labelled (skipped)", f"{s.already_done}"),
        ("labelled now", f"{len(s.labelled)}"),
        ("skipped: dead", f"{len(dead)}" + (f"  [{_ids(k.feature_id for k in dead)}]" if dead else "")),
        ("skipped: rare", f"{len(rare)}" + (f"  [{_ids(k.feature_id for k in rare)}]" if rare else "")),
        *([("skipped: gated (intruder)", f"{len(gated)}  [{_ids(gated)}]")] if gated else []),
        ("failed", f"{len(s.failed)}" + (f"  [{_ids(s.failed)}]" if s.failed else "")),
        ("left for a later run", f"{len(s.not_done)}"),
        ("mean simulation score (test)", "-" if s.mean_score is None else f"{s.mean_score:.3f}"),
        ("LLM calls (cached)", f"{s.llm_calls} ({s.cached_calls})"),
        ("spend", f"${s.spent_usd:.4f}"),
        ("stopped at budget", "yes" if s.stopped_at_budget else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}", file=out)
    if rare:
        print(f"rare: {rare[0].reason} (feature {rare[0].feature_id})", file=out)
    for f in sorted(s.failed)[:3]:
        print(f"failed feature {f}: {s.failed[f]}", file=out)
    if s.budget_message:
        print(s.budget_message, file=out)
    if s.labelled:
        print(f"see them: featurescribe sql --db DB \"SELECT feature_id, explanation, round(score, 3) AS score, "
              f"round(lift, 3) AS lift FROM labels WHERE source_id = '{s.source_id}' ORDER BY score DESC\"",
              file=out)


def run_label(db: str, options: label_options.LabelOptions) -> LabelSummary | None:
    """The label run the options describe (what `featurescribe.label(...)` runs too); None when
    `--batch --no-wait` only submitted batches."""
    if options.task_runner == "dask" and options.dask_address:
        from featurescribe.flows.runners import check_scheduler

        check_scheduler(options.dask_address)
    if options.batch:  # provider batch APIs first, then the run from the cache
        from featurescribe.flows.label_batch import run_label_batch

        return run_label_batch(db, options).summary
    from featurescribe.flows.label_flow import run_label_flow

    return run_label_flow(db, options)  # the Prefect label flow


def run(args: argparse.Namespace) -> int:
    summary = run_label(args.db, label_options.from_args(args))
    if summary is None:
        return ExitStatus.OK
    print_summary(summary, out=sys.stdout)
    print_call_outcomes(record_call_outcomes(args.db, summary.run_id), out=sys.stdout)
    if summary.exit_status != ExitStatus.OK:  # the reason on stderr too, where scripts look for it
        print(f"featurescribe: error: {summary.status_note() or 'the run ' + summary.run_status}", file=sys.stderr)
    return summary.exit_status  # 3 when some features failed, 1 when none could be labelled
