"""`featurescribe label`: sample, explain and score the features of a source.

    featurescribe label --db PATH --source SOURCE_ID [--features SPEC] [--explainer BACKEND]
                        [--simulator BACKEND] [--scorers simulation,detection,fuzzing]
                        [--candidates N] [--concurrency N] [--budget-usd X] [--no-cache]
                        [--method pairs|highlighted] [--chunk-size N]

It ends with a summary: features labelled, skipped (dead or rare, with the reason), failed, the
spend, and whether the run stopped at the budget.
"""

from __future__ import annotations

import argparse
import sys

from featurescribe.errors import FeaturescribeError
from featurescribe.flows import label_core
from featurescribe.flows.label_core import DEFAULT_CHUNK_SIZE, LabelParams, LabelSummary
from featurescribe.store.connection import DEFAULT_DB
from featurescribe.records import KINDS, SPLITS
from featurescribe.store.sampling import DEFAULT_COUNTS, SamplingConfig


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--source", required=True, help="SOURCE_ID, e.g. 6-mlp (harvest prints it)")
    p.add_argument("--features", default="all",
                   help="which features: 0:64, 3,17,40, all or alive (default: all; dead and rare "
                        "features are marked and reported, not explained)")
    p.add_argument("--explainer", default="baseline:tokens",
                   help="openai:MODEL, anthropic:MODEL, local:MODEL or baseline:tokens (default)")
    p.add_argument("--simulator", default="lexical",
                   help="lexical (default), baseline:tokens, openai:MODEL, anthropic:MODEL or local:MODEL")
    p.add_argument("--scorers", default="simulation",
                   help="comma-separated: simulation, detection, fuzzing, embedding (default: simulation)")
    p.add_argument("--candidates", type=int, default=1,
                   help="explanations per feature; with more than 1, the best on the valid split "
                        "is chosen (default: 1)")
    p.add_argument("--concurrency", type=int, default=16, help="LLM requests in flight (default: 16)")
    p.add_argument("--budget-usd", type=float, default=None,
                   help="no new LLM call starts once the run has spent this much")
    p.add_argument("--no-cache", action="store_true", help="do not answer from the response cache")
    p.add_argument("--method", choices=["auto", "pairs", "highlighted", "marked"], default="auto",
                   help="how LLM explainers see the examples: pairs (token and activation per line), "
                        "highlighted (active tokens in << >>, listed with activations) or marked "
                        "(active tokens in << >> only); default auto: marked for local models, else pairs")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"features per chunk (default: {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--explain-windows", type=int, default=None,
                   help="show the explainer at most this many windows (default: all of the "
                        "explain split; small local models want fewer)")
    p.add_argument("--logit-lens", type=int, nargs="?", const=10, default=0, metavar="K",
                   help="show LLM explainers the K (default 10) tokens each feature's output direction "
                        "promotes most, read through the source model's unembedding (loads the model)")
    p.add_argument("--window", type=int, default=32, help="tokens per example window (default: 32)")
    p.add_argument("--windows", default="", metavar="SPLIT.KIND=N,...",
                   help="windows per split and kind, changing the defaults "
                        f"({format_counts(DEFAULT_COUNTS)}); e.g. test.top=5,test.random=5 for a "
                        "cheaper local judge. Features sampled before keep their windows")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--redo", action="store_true",
                   help="label features that already have a scored label by this explainer too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    from featurescribe.flows.label_batch import add_batch_arguments

    add_batch_arguments(p)  # --batch, --no-wait, --batch-retry, --batch-poll
    from featurescribe.flows.runners import add_runner_arguments

    add_runner_arguments(p)  # --task-runner thread|dask, --workers, --dask-address


def params_from_args(args: argparse.Namespace) -> LabelParams:
    return LabelParams(
        source_id=args.source,
        features=args.features,
        explainer=args.explainer,
        simulator=args.simulator,
        scorers=tuple(s.strip().lower() for s in args.scorers.split(",") if s.strip()),
        candidates=args.candidates,
        concurrency=args.concurrency,
        budget_usd=args.budget_usd,
        use_cache=not args.no_cache,
        method=args.method,
        chunk_size=args.chunk_size,
        skip_done=not args.redo,
        explain_windows=args.explain_windows,
        logit_lens=args.logit_lens,
        sampling=SamplingConfig.with_counts(parse_window_counts(args.windows), window=args.window,
                                            seed=args.seed),
    )


def format_counts(counts) -> str:
    return ", ".join(f"{s}.{k}={n}" for s, kinds in counts.items() for k, n in kinds.items() if n)


def parse_window_counts(spec: str) -> dict[str, dict[str, int]]:
    """DEFAULT_COUNTS changed by 'split.kind=n,...' (FeaturescribeError for anything else)."""
    counts = {s: dict(DEFAULT_COUNTS.get(s, {})) for s in SPLITS}
    for item in (x.strip() for x in (spec or "").split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        split, dot, kind = key.strip().partition(".")
        if not (eq and dot) or split not in SPLITS or kind not in KINDS:
            raise FeaturescribeError(
                f"bad --windows item {item!r}: use SPLIT.KIND=N with SPLIT one of {', '.join(SPLITS)} "
                f"and KIND one of {', '.join(KINDS)}")
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0:
            raise FeaturescribeError(f"bad --windows item {item!r}: N must be a whole number >= 0")
        counts[split][kind] = n
    if not counts["explain"]["top"] + counts["explain"]["quantile"] + counts["explain"]["random"]:
        raise FeaturescribeError("--windows leaves the explain split empty: the explainer needs windows")
    if not counts["test"]["top"] + counts["test"]["quantile"] + counts["test"]["random"]:
        raise FeaturescribeError("--windows leaves the test split empty: nothing to score on")
    return counts


def _ids(ids) -> str:
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:12])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")


def print_summary(s: LabelSummary, out=None) -> None:
    out = out or sys.stdout
    dead = [k for k in s.skipped if k.status == "dead"]
    rare = [k for k in s.skipped if k.status == "rare"]
    rows = [
        ("run", s.run_id),
        ("source", s.source_id),
        ("explainer / simulator", f"{s.explainer} / {s.simulator}"),
        ("features selected", f"{s.n_selected}"),
        ("already labelled (skipped)", f"{s.already_done}"),
        ("labelled now", f"{len(s.labelled)}"),
        ("skipped: dead", f"{len(dead)}" + (f"  [{_ids(k.feature_id for k in dead)}]" if dead else "")),
        ("skipped: rare", f"{len(rare)}" + (f"  [{_ids(k.feature_id for k in rare)}]" if rare else "")),
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


def run_label(args: argparse.Namespace) -> int:
    """The command (cli.py finds it as run_label)."""
    from featurescribe.flows.label_batch import batch_options_from_args, run_label_batch

    batch = batch_options_from_args(args)
    if batch is not None:  # --batch: provider batch APIs first, then the run from the cache
        summary = run_label_batch(args.db, params_from_args(args), batch,
                                  progress=not args.no_progress).summary
        if summary is not None:
            print_summary(summary, out=sys.stdout)
        return 0
    from featurescribe.flows.label_flow import run_label_command

    summary = run_label_command(args)  # the Prefect label flow (flows/label_flow.py)
    print_summary(summary)
    return 0


