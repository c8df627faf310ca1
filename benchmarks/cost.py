"""Tokens and dollars per labelled feature, for each explainer/scorer combination, from the ledger.

    python benchmarks/cost.py --quick      # 12 features of a 4k-token smollm2 harvest
    python benchmarks/cost.py              # 48 features of a 12k-token harvest

Real smollm2-135m layer-6 MLP neurons are harvested from builtin:stdlib, then `featurescribe label`
runs with the default sampling through the real openai and anthropic SDKs against the tests' local
server (tests/fake_llm.py), which answers every prompt in the asked-for form. The server bills
whitespace-separated words as tokens (real tokenizers count more, especially for code), and its
answers are as long as real ones (a simulation answer repeats each token with its number).
The ledger (`llm_calls`) is summed per purpose (explain, simulate, detect, fuzz), and each
combination is priced at the list prices of featurescribe/llm/prices.json. Baseline calls (the
shuffled-explanation score) are counted with their scorer: they are part of what a score costs.
Then explain + simulation under each simulation option (`--sim-windows-per-call`, `--baseline`)
on gpt-4o-mini and claude-haiku-4-5, the first row being the behaviour before issue 16.
The last line is explain + simulation scoring on gpt-4o-mini with the default options.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

OPENAI_MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1", "gpt-4o"]
ANTHROPIC_MODELS = ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"]
SCORERS = ["simulation", "detection", "fuzzing"]
# the intervention scorer steers the source's model (the same forward passes whatever the explainer),
# so it runs with the `pairs` explainer only
STEERING_SCORERS = ["intervention"]
PURPOSE_OF = {"simulation": "simulate", "detection": "detect", "fuzzing": "fuzz", "intervention": "intervention"}


def responder(req):
    """Answer like a capable judge would, in the form each prompt asks for."""
    from tests.test_simulators import _shown_tokens, activations_answer, logprob_reply

    user = req.user_text
    props = json.dumps((req.json_schema or {}).get("properties", {}))
    if '"explanation"' in props:
        tag = hashlib.sha256(user.encode()).hexdigest()[:4]
        return json.dumps({"explanation": f'the tokens " def", " class" and " return" in Python code, '
                                          f'mostly at the start of a definition ({tag})'})
    if '"answers"' in props:
        n, what = re.search(r"each of the (\d+) (texts|pairs)", user).groups()
        if what == "pairs":  # the intervention judge answers a letter per pair
            return json.dumps({"answers": ["AB"[i % 2] for i in range(int(n))]})
        return json.dumps({"answers": [i % 2 for i in range(int(n))]})
    if '"activations"' in props:
        return activations_answer(user, lambda t: 0)
    # logprob simulation: the prompt ends with the windows' tokens, one a line
    lines = _shown_tokens(user)
    return logprob_reply(lines, [{"0": 0.7, "3": 0.2, "10": 0.1} for _ in lines])


def run(cmd: list[str]) -> str:
    from featurescribe.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(cmd)
    if rc != 0:
        raise SystemExit(f"featurescribe {' '.join(cmd)} failed ({rc}):\n{out.getvalue()[-2000:]}")
    return out.getvalue()


def copy_db(base: str, db: str) -> None:
    with open(base, "rb") as src, open(db, "wb") as dst:
        dst.write(src.read())


def ledger(db: str, backend: str) -> tuple[dict[str, tuple[int, int, int, int]], int]:
    """Per purpose: calls, input tokens, output tokens, input tokens read from the prompt cache;
    and the number of features labelled."""
    from featurescribe.store import open_db

    con = open_db(db, read_only=True)
    try:
        rows = con.execute(
            "SELECT purpose, count(*), sum(input_tokens), sum(output_tokens), "
            "sum(coalesce(cached_input_tokens, 0)) FROM llm_calls "
            "WHERE backend = ? AND status = 'ok' GROUP BY 1", [backend]).fetchall()
        n = con.execute("SELECT count(DISTINCT feature_id) FROM explanations e JOIN scores s "
                        "USING (explanation_id) WHERE e.explainer LIKE ?", [backend + ":%"]).fetchone()[0]
    finally:
        con.close()
    return {p: (int(c), int(i or 0), int(o or 0), int(k or 0)) for p, c, i, o, k in rows}, int(n)


def print_forward_passes(db: str, provider: str, n: int) -> None:
    """The intervention scorer's local forward passes (ledger rows, backend local, cost 0)."""
    from featurescribe.store import open_db

    con = open_db(db, read_only=True)
    try:
        passes, tin, tout, secs = con.execute(
            "SELECT count(*), sum(input_tokens), sum(output_tokens), sum(latency_s) FROM llm_calls "
            "WHERE backend = 'local' AND purpose = 'intervention'").fetchone()
    finally:
        con.close()
    print(f"{'  ' + provider + ' intervention: local steering':44s} {passes / n:6.1f} {(tin or 0) / n:8.0f} "
          f"{(tout or 0) / n:8.0f}   forward passes of the source model, {(secs or 0) / n:.1f} s a feature, $0")


# label options that change what pairs + simulation costs, the first the behaviour before issue 16
SIMULATION_OPTIONS = [
    ("one window a request, baseline every (before)", ["--sim-windows-per-call", "1", "--baseline", "every"]),
    ("5 windows a request, baseline every", ["--sim-windows-per-call", "5", "--baseline", "every"]),
    ("20 windows a request (one per split), baseline every", ["--sim-windows-per-call", "20", "--baseline", "every"]),
    ("1 window a request, baseline sample:10", ["--sim-windows-per-call", "1", "--baseline", "sample:10"]),
    ("5 windows a request, baseline sample:10 (default)", ["--sim-windows-per-call", "5", "--baseline", "sample:10"]),
    ("20 windows a request, baseline sample:10", ["--sim-windows-per-call", "20", "--baseline", "sample:10"]),
]


def pairs_simulation_cost(db: str, provider: str, model: str, prices) -> tuple[float, float, float, float]:
    """(calls, input tokens, output tokens, USD) per labelled feature for explain + simulation."""
    usage, n = ledger(db, provider)
    rows = [usage.get(p, (0, 0, 0, 0)) for p in ("explain", "simulate")]
    calls, tin, tout, tcached = (sum(r[i] for r in rows) for i in range(4))
    cost, _ = prices.cost(provider, model, tin, tout, tcached)
    return calls / n, tin / n, tout / n, cost / n


def print_simulation_options(work: str, base: str, features: str, prices) -> list[float]:
    """Pairs + simulation on gpt-4o-mini and claude-haiku-4-5 under each SIMULATION_OPTIONS row;
    returns the gpt-4o-mini cost per feature of each row."""
    print()
    print(f"{'pairs + simulation, by option':72s} {'calls':>6s} {'in tok':>8s} {'out tok':>8s}   $ per 1k features")
    openai_costs = []
    for provider, model in (("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")):
        for i, (name, extra) in enumerate(SIMULATION_OPTIONS):
            db = os.path.join(work, f"opt-{provider}-{i}.duckdb")
            copy_db(base, db)
            spec = f"{provider}:{model}"
            run(["label", "--db", db, "--source", "6-mlp", "--features", features, "--explainer", spec,
                 "--simulator", spec, "--method", "pairs", "--no-progress", *extra])
            calls, tin, tout, usd = pairs_simulation_cost(db, provider, model, prices)
            if provider == "openai":
                openai_costs.append(usd)
            print(f"{model + ': ' + name:72s} {calls:6.1f} {tin:8.0f} {tout:8.0f}   ${usd * 1000:.2f}")
    return openai_costs


def start_server():
    """The tests' local LLM server, answering through `responder`, with both SDKs pointed at it."""
    from tests.fake_llm import FakeLLMServer

    server = FakeLLMServer()
    server.responder = responder
    server.start()
    os.environ.update(OPENAI_BASE_URL=server.base_url_openai, OPENAI_API_KEY="bench",
                      ANTHROPIC_BASE_URL=server.base_url_anthropic, ANTHROPIC_API_KEY="bench")
    return server


def harvest(work: str, tokens: int, features: str) -> str:
    """Harvests smollm2-135m layer 6 MLP into a database under `work`; returns its path."""
    base = os.path.join(work, "harvest.duckdb")
    run(["harvest", "--db", base, "--model", "smollm2-135m", "--layer", "6", "--site", "mlp",
         "--corpus", "builtin:stdlib", "--max-tokens", str(tokens)])
    print(f"harvest: smollm2-135m layer 6 mlp, {tokens:,} tokens of builtin:stdlib; label --features {features}")
    print("tokens are the local server's estimate (whitespace-separated words); prices from featurescribe/llm/prices.json")
    return base


def print_scorer_row(label: str, ex, sc, n: int, provider: str, models: list[str], prices) -> dict[str, float]:
    """One explainer/scorer row from the explain (`ex`) and scorer (`sc`) ledger sums; returns each
    model's cost of 1k features."""
    calls, tin, tout, tcached = (a + b for a, b in zip(ex, sc))
    per_in, per_out = tin / n, tout / n
    costs = {}
    for m in models:
        costs[m], _ = prices.cost(provider, m, int(round(per_in * 1000)), int(round(per_out * 1000)),
                                  int(round(tcached / n * 1000)))
    print(f"{label:44s} {calls / n:6.1f} {per_in:8.0f} {per_out:8.0f}   "
          + ", ".join(f"{m} ${c:.3f}/1k" for m, c in costs.items()))
    return costs


def label_and_price(work: str, base: str, features: str, provider: str, models: list[str], method: str,
                    prices) -> float | None:
    """Labels a copy of the harvest with one provider and method, all its scorers, and prints a row a
    scorer; returns the headline (gpt-4o-mini, pairs + simulation, USD a feature) when it is this run."""
    db = os.path.join(work, f"{provider}-{method}.duckdb")
    copy_db(base, db)
    spec = f"{provider}:{models[0]}"
    scorers = SCORERS + (STEERING_SCORERS if method == "pairs" else [])
    run(["label", "--db", db, "--source", "6-mlp", "--features", features, "--explainer", spec,
         "--simulator", spec, "--scorers", ",".join(scorers), "--method", method, "--no-progress"])
    usage, n = ledger(db, provider)
    if not n:
        raise SystemExit(f"{provider} {method}: no feature was labelled")
    ex = usage.get("explain", (0, 0, 0, 0))
    headline = None
    for scorer in scorers:
        sc = usage.get(PURPOSE_OF[scorer], (0, 0, 0, 0))
        costs = print_scorer_row(f"{provider} {method} explain + {scorer}", ex, sc, n, provider, models, prices)
        if provider == "openai" and scorer == "simulation" and method == "pairs":
            headline = costs["gpt-4o-mini"] / 1000
    if "intervention" in scorers:
        print_forward_passes(db, provider, n)
    return headline


def print_scorer_costs(work: str, base: str, features: str, prices) -> float:
    """The table of each explainer/scorer combination; returns the headline cost."""
    print()
    print(f"{'explainer / scorer':44s} {'calls':>6s} {'in tok':>8s} {'out tok':>8s}   per labelled feature")
    headline = None
    for provider, models in (("openai", OPENAI_MODELS), ("anthropic", ANTHROPIC_MODELS)):
        for method in ("pairs", "highlighted"):
            cost = label_and_price(work, base, features, provider, models, method, prices)
            if cost is not None:
                headline = cost
    return headline


def print_summary(headline: float, by_option: list[float]) -> None:
    before, every = by_option[0], by_option[1]  # the behaviour before; 5 windows + baseline every
    print()
    print(f"cost_per_feature_usd_gpt4o_mini_before: {before:.5f}")
    print(f"cost_per_feature_usd_gpt4o_mini_baseline_every: {every:.5f} ({every / before:.3f}x before)")
    print(f"cost_ratio_defaults_vs_before: {headline / before:.3f}")
    print(f"cost_per_feature_usd_gpt4o_mini: {headline:.5f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tokens, features = (4_000, "0:12") if args.quick else (12_000, "0:48")

    from featurescribe.llm.prices import PriceTable

    prices = PriceTable.load()
    server = start_server()
    work = tempfile.mkdtemp(prefix="fs-cost-")
    base = harvest(work, tokens, features)
    headline = print_scorer_costs(work, base, features, prices)
    by_option = print_simulation_options(work, base, features, prices)
    server.stop()
    print_summary(headline, by_option)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
