"""Explanation quality: how well each judge tells true explanations from mismatched ones, and the
scores offline explainers get, on planted features and on real SmolLM2-135M MLP neurons.

1. Planted bed (featurescribe.testbed.planted): features defined by rules over real tokens of
   the builtin corpus (smollm2-135m tokenizer), each with its true explanation; every other
   plant's explanation is a mismatched candidate. For each judge and scorer: the AUC with which
   it ranks the true explanation above the mismatched ones (per feature, then averaged), on the
   lexical plants (a token list describes them) and the contextual ones (text in brackets,
   the token after a dot).
   - `lexical` (simulation, detection, fuzzing), all plants;
   - `baseline:tokens` as a simulator: it ignores the explanation, so its AUC is 0.5 by design;
   - the `embedding` scorer (offline all-MiniLM-L6-v2), all plants (`planted_auc_embedding`);
   - `local:smollm2-135m` simulation on three plants (digits, capitalised words, text in
     brackets), each with its true and the two mismatched explanations (6 true-vs-mismatched
     pairs); and (full size only) the local model as the detection and fuzzing judge;
   - any API model named in FEATURESCRIBE_QUALITY_JUDGES (e.g. "openai:gpt-4o-mini"), all
     scorers, all plants, when its API key is set.
   Also the baseline:tokens explainer's explanations of the plants, scored by lexical.
2. Real neurons: `featurescribe harvest` of smollm2-135m layer 3 MLP over the builtin corpus,
   then `featurescribe label` with the baseline:tokens explainer, the lexical simulator and all
   three scorers: the distribution of scores, their baselines and lift, from the database.

    python benchmarks/quality.py --quick
    python benchmarks/quality.py

Sizes. --quick: a bed over 20,000 tokens; the local simulator on 2 top + 2 random test windows
of each of the three plants (9 explanations, 36 forward passes), no local detection/fuzzing
judge; real neurons from 20,000 tokens, features 0:64 (the CLI's harvest and label, run in this
process). Full: 60,000 tokens; 10 + 10 windows and the local detection/fuzzing judge; 100,000
tokens, features 0:256. The quick run takes under a minute on 2 idle CPU cores.

Last line: `planted_auc_local: A` (the local simulator's AUC on the planted bed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from featurescribe.records import FeatureExamples  # noqa: E402
from featurescribe.scorers import score_explanations  # noqa: E402
from featurescribe.testbed.planted import PlantedBed, build_bed, ranking_auc  # noqa: E402


def fig(name: str, value) -> None:
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def trim(bed: PlantedBed, n_top: int, n_random: int) -> dict:
    """The bed's examples with at most n_top top and n_random random test windows."""
    out = {}
    for key, fe in bed.examples.items():
        keep = [w for w in fe.windows if w.split != "test"]
        keep += fe.split("test", "top")[:n_top] + fe.split("test", "random")[:n_random]
        out[key] = FeatureExamples(fe.source_id, fe.feature_id, fe.max_act, keep)
    return out


def judge_aucs(label: str, bed: PlantedBed, exps, res, scorers) -> dict:
    results = getattr(res, "results", res)  # a ScoreOutcome or its list of results
    lexical = [p.feature_id for p in bed.plants if p.lexical]
    context = [p.feature_id for p in bed.plants if not p.lexical]
    out = {}
    for sc in scorers:
        for part, feats in (("lexical_plants", lexical), ("contextual_plants", context)):
            r = ranking_auc(exps, results, sc, feats)
            if r.per_feature:
                out[(sc, part)] = r.auc
                fig(f"planted_auc_{label}_{sc}_{part}", r.auc)
    return out


def describe(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return "n=0"
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return f"n={v.size} mean={v.mean():.3f} p10={q[0]:.3f} median={q[1]:.3f} p90={q[2]:.3f}"


def planted_bed(args) -> PlantedBed:
    t0 = time.perf_counter()
    bed = build_bed(tokenizer="auto", max_tokens=args.bed_tokens)
    print(f"# planted bed: {len(bed.examples)} features over {bed.n_tokens} tokens "
          f"({bed.tokenizer} tokenizer), {time.perf_counter() - t0:.0f} s")
    for p in bed.plants:
        print(f"#   {p.feature_id} {p.name:12s} {'lexical   ' if p.lexical else 'contextual'} {p.explanation}")
    return bed


async def offline_judges(bed: PlantedBed, exps) -> None:
    """The lexical judge and the explanation-blind baseline:tokens simulator, on every plant."""
    res = await score_explanations(exps, bed.examples, simulator="lexical",
                                   scorers="simulation,detection,fuzzing", baselines=False)
    judge_aucs("lexical", bed, exps, res.results, ("simulation", "detection", "fuzzing"))
    res = await score_explanations(exps, bed.examples, simulator="baseline:tokens", baselines=False)
    fig("planted_auc_baseline_tokens_simulation", ranking_auc(exps, res.results, "simulation").auc)


async def embedding_judge(bed: PlantedBed, exps) -> None:
    """The embedding scorer (offline MiniLM): retrieval AUC of activating windows per explanation."""
    t1 = time.perf_counter()
    res = (await score_explanations(exps, bed.examples, scorers="embedding", baselines=False)).results
    judge_aucs("minilm", bed, exps, res, ("embedding",))
    true_ids = {e.explanation_id for e in exps if e.method == "true"}
    print(f"# planted, embedding scorer: true explanations {describe([r.value for r in res if r.explanation_id in true_ids])}; "
          f"mismatched {describe([r.value for r in res if r.explanation_id not in true_ids])}; "
          f"{time.perf_counter() - t1:.0f} s")
    fig("planted_auc_embedding", ranking_auc(exps, res, "embedding").auc)


async def tokens_explainer(bed: PlantedBed) -> None:
    """The offline explainer's explanations of the plants, scored by lexical."""
    from featurescribe.labelers import TokenListExplainer
    from featurescribe.records import Explanation

    explainer = TokenListExplainer()
    mine = []
    for p in bed.plants:
        text = explainer.explanation(bed.examples[("planted", p.feature_id)])
        if text:
            mine.append(Explanation(f"tokens-{p.feature_id}", "planted", p.feature_id, text,
                                    "baseline:tokens", "tokens"))
            print(f"#   baseline:tokens explains {p.name}: {text}")
    res = await score_explanations(mine, bed.examples, simulator="lexical",
                                   scorers="simulation,detection,fuzzing")
    for sc in ("simulation", "detection", "fuzzing"):
        rs = [r for r in res.results if r.scorer == sc]
        print(f"# planted, baseline:tokens explainer, lexical {sc}: score {describe([r.value for r in rs])}; "
              f"shuffled {describe([r.baseline_shuffled for r in rs])}"
              + (f"; token baseline {describe([r.baseline_tokens for r in rs])}" if sc == "simulation" else ""))
    lift = [r.value - r.baseline_shuffled for r in res.results if r.scorer == "simulation" and r.baseline_shuffled is not None]
    fig("planted_tokens_explainer_mean_lift", float(np.mean(lift)) if lift else 0.0)


async def api_judges(bed: PlantedBed, exps) -> None:
    """The API judges the user named in FEATURESCRIBE_QUALITY_JUDGES."""
    for spec in [s.strip() for s in os.environ.get("FEATURESCRIBE_QUALITY_JUDGES", "").split(",") if s.strip()]:
        from featurescribe.llm import make_client

        try:
            client = make_client(spec)
        except Exception as err:  # noqa: BLE001 - a missing key is reported, not fatal
            print(f"# {spec}: skipped ({err})")
            continue
        t0 = time.perf_counter()
        res = await score_explanations(exps, bed.examples, simulator=spec, client=client,
                                       scorers="simulation,detection,fuzzing", baselines=False)
        await client.aclose()
        tag = spec.replace(":", "_").replace("-", "_").replace(".", "_")
        judge_aucs(tag, bed, exps, res.results, ("simulation", "detection", "fuzzing"))
        print(f"# {spec}: {len(res.failures)} failures, ${client.spent_usd:.4f}, {time.perf_counter() - t0:.0f} s")


def print_local_simulation(bed: PlantedBed, args, ids: list[int], local_exps, res, took: float) -> None:
    """Each plant's simulation score under its true and mismatched explanations, and the largest spread."""
    by_id = {r.explanation_id: r.value for r in res.results}
    for fid in ids:
        row = {e.explanation_id.split("-", 2)[2]: by_id.get(e.explanation_id) for e in local_exps if e.feature_id == fid}
        print(f"# local:{args.model} on {bed.plant(fid).name}: " + ", ".join(
            f"{k}{'*' if k == bed.plant(fid).name else ''}={v:.3f}" for k, v in row.items() if v is not None))
    spread = [max(v for k, v in by_id.items() if k.startswith(f"planted-{fid}-"))
              - min(v for k, v in by_id.items() if k.startswith(f"planted-{fid}-")) for fid in ids]
    n_pairs = sum(1 for e in local_exps if e.method != "true")
    print(f"# local:{args.model}: {len(local_exps)} explanations x {args.local_top}+{args.local_random} test "
          f"windows in {took:.0f} s, {len(res.failures)} failures; AUC over {n_pairs} true-vs-mismatched "
          f"pairs; largest spread between one feature's explanations: {max(spread):.3f} (* = the true one)")


async def local_simulation(bed: PlantedBed, args):
    """The local model as a simulator, on three plants; returns its AUC and what the local judge
    reuses: the explanations, the trimmed examples, the simulator and its client."""
    from featurescribe.llm import make_client
    from featurescribe.scorers.simulators import LocalSimulator

    names = ["digits", "capitalised", "brackets"]
    ids = [p.feature_id for p in bed.plants if p.name in names]
    local_exps = [e for e in bed.explanations(ids) if e.text in {bed.plant(i).explanation for i in ids}]
    examples = trim(bed, args.local_top, args.local_random)
    client = make_client(f"local:{args.model}", use_cache=False)
    sim = LocalSimulator(client)
    t0 = time.perf_counter()
    res = await score_explanations(local_exps, examples, simulator=sim, baselines=False)
    took = time.perf_counter() - t0
    ranking = ranking_auc(local_exps, res.results, "simulation")
    print_local_simulation(bed, args, ids, local_exps, res, took)
    return ranking.auc, (local_exps, examples, sim, client)


async def local_judge(args, local_exps, examples, sim, client) -> None:
    """The local model as the detection and fuzzing judge."""
    t0 = time.perf_counter()
    res = await score_explanations(local_exps, examples, simulator=sim, client=client,
                                   scorers="detection,fuzzing", baselines=False)
    for sc in ("detection", "fuzzing"):
        fig(f"planted_auc_local_{sc}", ranking_auc(local_exps, res.results, sc).auc)
        vals = sorted({round(r.value, 3) for r in res.results if r.scorer == sc})
        print(f"# local:{args.model} as {sc} judge: balanced accuracies seen {vals}")
    print(f"# local:{args.model} as judge (P('1') vs P('0'), one pass a batch): {len(res.results)} scored, "
          f"{len(res.failures)} failed, {time.perf_counter() - t0:.0f} s")


async def planted(args) -> float:
    """Every judge on the planted beds; returns the local simulator's AUC."""
    bed = planted_bed(args)
    exps = bed.explanations()
    await offline_judges(bed, exps)
    await embedding_judge(bed, exps)
    await tokens_explainer(bed)
    await intervention_bed(args)
    await intruder_bed(bed, args)
    await api_judges(bed, exps)
    auc, local = await local_simulation(bed, args)
    if not args.local_judge:
        print(f"# local:{args.model} as detection/fuzzing judge: full size only")
        return auc
    await local_judge(args, *local)
    return auc


async def intruder_bed(bed: PlantedBed, args) -> None:
    """The intruder scorer (as the label gate runs it: explain windows, one set of 5 per 4
    activating windows) on every plant and on as many noise features (scattered activations):
    the AUC with which its accuracy ranks the plants above the noise, per judge."""
    from featurescribe.scorers.classify import LexicalJudge, LocalJudge
    from featurescribe.scorers.intruder import gate_feature
    from featurescribe.testbed.planted import noise_features, separation_auc

    judges = [("lexical", LexicalJudge())]
    if args.local_judge:
        from featurescribe.llm import make_client

        judges.append(("local", LocalJudge(make_client(f"local:{args.model}", use_cache=False))))
    plants = [bed.examples[k] for k in sorted(bed.examples)]
    noise = noise_features(bed)
    for tag, judge in judges:
        t0 = time.perf_counter()
        acc = [[(await gate_feature(judge, fe)).accuracy for fe in group] for group in (plants, noise)]
        print(f"# intruder, {tag} judge: plants {describe(acc[0])}; noise {describe(acc[1])} "
              f"(chance 0.2), {time.perf_counter() - t0:.0f} s")
        fig(f"planted_auc_{tag}_intruder", separation_auc(acc[0], acc[1]))


async def intervention_bed(args) -> None:
    """The intervention scorer on the planted bed of output directions (steer/planted.py): each
    plant's true description against the others', judged by `lexical` and by the local model (both
    read the same continuations: the steering is done once per plant)."""
    from featurescribe.llm import make_client
    from featurescribe.llm.backends.local import get_local_model
    from featurescribe.scorers.intervention import LexicalPairJudge, make_pair_judge, score_intervention
    from featurescribe.testbed.planted import ranking_auc
    from featurescribe.steer.planted import build_output_bed

    t0 = time.perf_counter()
    bed = build_output_bed(get_local_model(args.model, device="cpu"))
    exps = bed.explanations()
    print(f"# output bed: {len(bed.plants)} directions added after layer {bed.layer} of {args.model} "
          f"(strength unit: residual norm {bed.scale:.0f}), each with its true and {len(bed.plants) - 1} "
          "mismatched descriptions")
    client = make_client(f"local:{args.model}", use_cache=False)
    for tag, judge in (("lexical", LexicalPairJudge()), ("local", make_pair_judge(f"local:{args.model}", client))):
        res = [await score_intervention(e, bed.steering, judge) for e in exps]
        r = ranking_auc(exps, res, "intervention")
        true = [x.value for e, x in zip(exps, res) if e.method == "true"]
        print(f"# {tag} intervention judge: true descriptions score {describe(true)}, mismatched "
              f"{describe([x.value for e, x in zip(exps, res) if e.method != 'true'])}; "
              f"{time.perf_counter() - t0:.0f} s so far")
        fig(f"planted_auc_{tag}_intervention", r.auc)
    await client.aclose()


def cli(argv: list[str]) -> tuple[int, str]:
    """`featurescribe ARGV` in this process (the model stays loaded; no second interpreter)."""
    from featurescribe.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as exc:  # argparse and friends
        rc = exc.code if isinstance(exc.code, int) else 1
    return int(rc or 0), err.getvalue() + out.getvalue()


def real_neurons(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "q.duckdb")
        t0 = time.perf_counter()
        rc, out = cli(["harvest", "--db", db, "--model", args.model, "--layer", str(args.layer),
                       "--site", "mlp", "--max-tokens", str(args.real_tokens), "--device", "cpu"])
        if rc != 0:
            print(f"# real neurons: harvest failed ({out.strip().splitlines()[-1:]}); planted bed only")
            return
        source = f"{args.layer}-mlp"
        rc, out = cli(["label", "--db", db, "--source", source, "--features", args.real_features,
                       "--explainer", "baseline:tokens", "--simulator", "lexical",
                       "--scorers", "simulation,detection,fuzzing", "--no-progress"])
        if rc != 0:
            print(f"# real neurons: label failed ({out.strip().splitlines()[-1:]}); planted bed only")
            return
        print(f"# real neurons: smollm2-135m layer {args.layer} MLP, {args.real_tokens} tokens, features "
              f"{args.real_features}: harvest + label in {time.perf_counter() - t0:.0f} s")
        from featurescribe.store import open_db

        con = open_db(db, read_only=True)
        try:
            rows = con.execute("""
                SELECT s.scorer, s.value, s.baseline_shuffled, s.baseline_tokens, s.details
                FROM scores s JOIN explanations e USING (explanation_id)
                WHERE e.source_id = ? AND s.split = 'test'""", [source]).fetchall()
            n_feat = con.execute("SELECT count(*) FROM labels WHERE source_id = ?", [source]).fetchall()[0][0]
            status = con.execute("SELECT coalesce(status, '?'), count(*) FROM features WHERE source_id = ? "
                                 "GROUP BY 1 ORDER BY 1", [source]).fetchall()
            sample = con.execute("""SELECT feature_id, explanation, round(score, 3), round(lift, 3) FROM labels
                                    WHERE source_id = ? ORDER BY score DESC LIMIT 5""", [source]).fetchall()
        finally:
            con.close()
        print(f"# features labelled: {n_feat}; status: {dict(status)}")
        for sc in ("simulation", "detection", "fuzzing"):
            rs = [r for r in rows if r[0] == sc]
            print(f"# real, baseline:tokens explainer, lexical {sc}: score {describe([r[1] for r in rs])}; "
                  f"shuffled {describe([r[2] for r in rs])}"
                  + (f"; token baseline {describe([r[3] for r in rs])}" if sc == "simulation" else ""))
            if rs:
                fig(f"real_mean_{sc}_lexical", float(np.mean([r[1] for r in rs])))
        sims = [r for r in rows if r[0] == "simulation"]
        if sims:
            lift = [r[1] - r[2] for r in sims if r[2] is not None]
            fig("real_mean_simulation_lift", float(np.mean(lift)) if lift else 0.0)
            flags = sum(1 for r in sims if "flag" in json.loads(r[4]))
            print(f"# simulation scores flagged degenerate (0 by rule): {flags} of {len(sims)}")
        for f, text, score, lift in sample:
            print(f"#   best: feature {f}: {text}  score {score} lift {lift}")


async def main_async(args) -> int:
    auc = await planted(args)
    real_neurons(args)
    fig("planted_auc_local", auc)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=3)
    args = ap.parse_args()
    args.bed_tokens = 20_000 if args.quick else 60_000
    args.local_top, args.local_random = (2, 2) if args.quick else (10, 10)
    args.local_judge = not args.quick  # the local detection/fuzzing judge (AUC 0.5 at quick sizes)
    args.real_tokens = 20_000 if args.quick else 100_000
    args.real_features = "0:64" if args.quick else "0:256"
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
