"""Databases for the export and report tests, built directly through the store.

`build_demo_db` makes a small, realistic database: two sources of a small model, real-looking
token sequences, features that fire by known rules (digits, capitalised words, text in brackets,
" the", ...), a few dead ones, top/quantile/random example windows in disjoint splits, LLM and
baseline explanations (one failed), simulation/detection/fuzzing scores with baselines and
details, and the stored simulations behind the simulation scores.

`build_large_db` makes many features quickly in SQL, for the memory checks.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from featurescribe.store import open_db
from featurescribe.store.activation_store import insert_activations_query
from featurescribe.store.bulk import insert_arrow

TEXTS = [
    "The committee met on 12 March 2021 to discuss the budget (about 4.5 million dollars).",
    "In the morning, Alice walked to the station and bought a ticket for 3 euros.",
    "def parse(line): return [int(x) for x in line.split(',')]",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "The results (see Table 2) show a clear improvement over the baseline.",
    "She said that the meeting would start at 9:30, not at 10:00.",
    "Rivers in the north (such as the Thames) flood every few years.",
    "Our model reaches 87.3 percent accuracy on the test set of 5000 examples.",
    "John and Mary visited London in June, then flew to New York.",
    "The function returns None when the input list is empty (or missing).",
    "Over 200 people attended the conference in Tokyo last year.",
    "The cat sat on the mat, and the dog slept by the fire.",
    "Version 3.11 of Python was released in October 2022.",
    "He wrote the report quickly, checking every number twice.",
    "Prices rose by 7 percent (the highest in a decade) according to the bank.",
    "We trained the network for 40 epochs with a batch size of 64.",
    "The river flows through the valley and into the sea.",
    "Einstein published the theory of relativity in 1905 and 1915.",
    "if x > 0: print('positive') else: print('negative')",
    "The library (founded in 1850) holds more than a million books.",
    "Maria ordered coffee, two croissants and a glass of water.",
    "The train from Boston arrives at 6 in the evening.",
    "Most of the students passed the exam on the first attempt.",
    "The mountain is 8848 metres high and very hard to climb.",
    "After the storm, the town (mostly wooden houses) was rebuilt.",
    "The French Revolution began in 1789 in Paris.",
    "Add 2 cups of flour, 1 egg and a pinch of salt.",
    "The old bridge was closed for repairs during the summer.",
    "Google and Microsoft announced new models this week.",
    "The speed of light is about 300000 kilometres per second.",
]

CTX = 32
_TOKEN_RE = re.compile(r"\s?[A-Za-z]+|\s?\d|\s?[^\sA-Za-z\d]")


def tokenize(text: str) -> list[str]:
    """A crude GPT-2-like split: words keep their leading space, digits one by one."""
    return _TOKEN_RE.findall(text)


@dataclass
class Plant:
    name: str
    explanation: str
    rule: Callable[[list[str], int], float]  # tokens, position -> strength in [0, 1]


def _inside_brackets(tokens: list[str], i: int) -> float:
    depth = 0
    for t in tokens[:i]:
        depth += t.strip() == "("
        depth -= t.strip() == ")"
    return 1.0 if depth > 0 and tokens[i].strip() not in "()" else 0.0


PLANTS = [
    Plant("digits", "digits in numbers, years and times", lambda t, i: 1.0 if t[i].strip().isdigit() else 0.0),
    Plant("capital", "capitalised words such as names of people and places",
          lambda t, i: 1.0 if t[i].strip()[:1].isupper() and i > 0 else 0.0),
    Plant("brackets", "text inside round brackets", _inside_brackets),
    Plant("the", 'the word " the"', lambda t, i: 1.0 if t[i] == " the" else 0.0),
    Plant("comma", "commas separating items or clauses", lambda t, i: 1.0 if t[i] == "," else 0.0),
    Plant("period", "the full stop at the end of a sentence", lambda t, i: 1.0 if t[i] == "." else 0.0),
    Plant("in", 'the preposition " in" before places and dates', lambda t, i: 1.0 if t[i] == " in" else 0.0),
    Plant("and", 'the conjunction " and"', lambda t, i: 1.0 if t[i] == " and" else 0.0),
    Plant("after_the", 'nouns right after " the"', lambda t, i: 0.8 if i > 0 and t[i - 1] == " the" else 0.0),
    Plant("code", "Python code keywords such as def, return, if and print",
          lambda t, i: 1.0 if t[i].strip() in {"def", "return", "if", "print", "else", "for", "int"} else 0.0),
    Plant("of", 'the word " of" in phrases like "capital of"', lambda t, i: 1.0 if t[i] == " of" else 0.0),
    Plant("percent", "percentages and amounts of money", lambda t, i: 1.0 if t[i].strip() in {"percent", "dollars", "euros"} else 0.0),
]

SOURCES = [
    {"source_id": "6-mlp", "model_id": "smollm2-135m", "hook_name": "model.layers.6.mlp.act_fn",
     "layer": 6, "kind": "neuron", "width": 24, "site": "mlp", "threshold": 0.0},
    {"source_id": "6-res-sae16", "model_id": "smollm2-135m", "hook_name": "model.layers.6",
     "layer": 6, "kind": "sae", "width": 16, "site": "resid", "threshold": 0.0},
]
T0 = datetime(2025, 1, 2, 3, 4, 5)


def _pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def _f32(v: float) -> float:
    """Round to what a REAL column keeps, printed short (the exporters read REALs that way)."""
    import struct

    f = struct.unpack("f", struct.pack("f", v))[0]
    for digits in range(6, 10):
        s = float(f"{f:.{digits}g}")
        if struct.unpack("f", struct.pack("f", s))[0] == f:
            return s
    return f


def _insert_sequences(con) -> tuple[list[tuple[int, list[int], list[str]]], int]:
    """The sequences and the two sources; (seq_id, token ids, tokens) per sequence, and the token count."""
    vocab: dict[str, int] = {}
    seqs = []
    for sid, text in enumerate(TEXTS):
        toks = ["<|endoftext|>"] + tokenize(text)
        toks = toks[:CTX]
        ids = [vocab.setdefault(t, len(vocab) + 1) for t in toks]
        seqs.append((sid, ids, toks))
    insert_arrow(con, "sequences", {
        "seq_id": [s[0] for s in seqs], "token_ids": [s[1] for s in seqs],
        "tokens": [s[2] for s in seqs], "tokenizer_id": ["smollm2-135m"] * len(seqs),
        "corpus": ["builtin:tiny"] * len(seqs), "corpus_index": [s[0] for s in seqs],
    })
    n_tokens = sum(len(s[2]) for s in seqs)
    insert_arrow(con, "sources", {
        **{k: [s[k] for s in SOURCES] for k in SOURCES[0]},
        "corpus": ["builtin:tiny"] * 2, "ctx": [CTX] * 2, "n_tokens": [n_tokens] * 2,
        "created_at": [T0, T0],
    })
    return seqs, n_tokens


def _plant_activations(src: dict, seqs: list, dead: set[int], rng: random.Random):
    """({feature: plant}, {feature: {(seq_id, pos): act}}): each feature fires by its plant's rule,
    with a little noise; the dead ones never fire."""
    plant_of = {}
    acts: dict[int, dict[tuple[int, int], float]] = {}
    for f in range(src["width"]):
        plant = PLANTS[(f * 5 + (3 if src["kind"] == "sae" else 0)) % len(PLANTS)]
        plant_of[f] = plant
        scale = 2.0 + (f % 7) * 0.75
        table = {}
        if f not in dead:
            for sid, _, toks in seqs:
                for i in range(len(toks)):
                    s = plant.rule(toks, i)
                    if s > 0:
                        table[(sid, i)] = round(scale * s * (0.6 + 0.4 * rng.random()), 4)
                    elif rng.random() < 0.01:
                        table[(sid, i)] = round(0.05 + 0.2 * rng.random(), 4)
        acts[f] = table
    return plant_of, acts


def _insert_activations_and_features(con, src: dict, acts: dict, n_tokens: int) -> None:
    width = src["width"]
    rows = [(f, sid, pos, a) for f in range(width) for (sid, pos), a in sorted(acts[f].items())]
    insert_arrow(con, "activations", {
        "source_id": [src["source_id"]] * len(rows), "feature_id": [r[0] for r in rows],
        "seq_id": [r[1] for r in rows], "pos": [r[2] for r in rows], "act": [r[3] for r in rows],
    })
    feats = {k: [] for k in ("source_id", "feature_id", "n_active", "frac_active", "max_act",
                             "mean_act", "status", "skip_reason")}
    for f in range(width):
        vals = list(acts[f].values())
        feats["source_id"].append(src["source_id"])
        feats["feature_id"].append(f)
        feats["n_active"].append(len(vals))
        feats["frac_active"].append(len(vals) / n_tokens)
        feats["max_act"].append(max(vals) if vals else None)
        feats["mean_act"].append(sum(vals) / len(vals) if vals else None)
        feats["status"].append("dead" if not vals else "ok")
        feats["skip_reason"].append("never active" if not vals else None)
    insert_arrow(con, "features", feats)


def _insert_examples(con, src: dict, seqs: list, acts: dict, dead: set[int],
                     rng: random.Random) -> dict[int, list[tuple]]:
    """Top windows (one per sequence), a quantile pair and random windows of each live feature;
    {feature: [(seq_id, start, end, split, kind)]}."""
    ex = {k: [] for k in ("source_id", "feature_id", "seq_id", "start_pos", "end_pos", "split",
                          "kind", "rank", "quantile", "max_act")}
    windows: dict[int, list[tuple]] = {}

    def add(f, sid, start, end, split, kind, rank, q=None):
        wmax = max([acts[f].get((sid, p), 0.0) for p in range(start, end)], default=0.0)
        for k, v in zip(ex, (src["source_id"], f, sid, start, end, split, kind, rank, q, wmax)):
            ex[k].append(v)
        windows.setdefault(f, []).append((sid, start, end, split, kind))

    for f in range(src["width"]):
        if f in dead:
            continue
        best = {}
        for (sid, pos), a in acts[f].items():
            if sid not in best or a > best[sid][1]:
                best[sid] = (pos, a)
        order = sorted(best.items(), key=lambda kv: (-kv[1][1], kv[0]))
        used = set()
        splits = ["explain", "valid", "test"]
        for r, (sid, (pos, a)) in enumerate(order[:9]):
            start = max(0, pos - 8)
            end = min(len(seqs[sid][2]), start + 12)
            add(f, sid, start, end, splits[r % 3], "top", r // 3)
            used.add(sid)
        rest = [sid for sid, _ in order[9:]]
        for q, sid in enumerate(rest[:2]):
            pos = best[sid][0]
            start = max(0, pos - 6)
            add(f, sid, start, min(len(seqs[sid][2]), start + 12), "test", "quantile", q, q)
            used.add(sid)
        free = [s for s in range(len(seqs)) if s not in used]
        rng.shuffle(free)
        for r, sid in enumerate(free[:4]):
            start = rng.randrange(0, max(1, len(seqs[sid][2]) - 12))
            add(f, sid, start, min(len(seqs[sid][2]), start + 12), ["valid", "test"][r % 2], "random", r)
    insert_arrow(con, "examples", ex)
    return windows


def _simulation_score(sc: dict, sim_cols: dict, eid: str, split: str, quality: float, plant: Plant,
                      seqs: list, table: dict, windows: list[tuple], rng: random.Random) -> None:
    """A simulation score of explanation `eid` on the windows of `split` (`table`: the feature's
    activations); the simulations behind it too when the split is 'test'."""
    true_all, pred_all, per_kind = [], [], {}
    for sid, start, end, wsplit, kind in windows:
        if wsplit != split:
            continue
        true = [_f32(table.get((sid, p), 0.0)) for p in range(start, end)]
        toks = seqs[sid][2][start:end]
        pred = [_f32(min(10.0, 10 * quality * plant.rule(seqs[sid][2], p)
                         + rng.random() * (1 - quality) * 3)) for p in range(start, end)]
        true_all += true
        pred_all += pred
        per_kind.setdefault(kind, ([], []))
        per_kind[kind][0].extend(true)
        per_kind[kind][1].extend(pred)
        if split == "test":
            for k, v in zip(sim_cols, (eid, "lexical", sid, start, split, true, pred, kind)):
                sim_cols[k].append(v)
        assert len(toks) == len(true)
    value = _pearson(true_all, pred_all)
    details = {"per_kind": {k: round(_pearson(*v), 6) for k, v in sorted(per_kind.items())},
               "n_tokens": len(true_all)}
    for k, v in zip(sc, (eid, "simulation", value, "lexical", len(true_all), json.dumps(details),
                         split, round(0.1 * rng.random() - 0.05, 6), round(0.3 + 0.2 * rng.random(), 6),
                         "run-demo", T0)):
        sc[k].append(v)


def _detection_score(sc: dict, eid: str, scorer: str, windows: list[tuple], rng: random.Random) -> None:
    """A detection or fuzzing score on the test split, with per-example records."""
    recs = []
    for sid, start, end, wsplit, kind in windows:
        if wsplit != "test":
            continue
        activating = kind != "random"
        p = round(min(1.0, max(0.0, (0.8 if activating else 0.2) + rng.uniform(-0.35, 0.35))), 4)
        recs.append({"seq_id": sid, "start_pos": start, "end_pos": end, "kind": kind,
                     "activating": activating, "prediction": p >= 0.5, "probability": p,
                     "correct": (p >= 0.5) == activating})
    pos = [r for r in recs if r["activating"]]
    neg = [r for r in recs if not r["activating"]]
    tpr = sum(r["correct"] for r in pos) / len(pos) if pos else 0.0
    tnr = sum(r["correct"] for r in neg) / len(neg) if neg else 0.0
    for k, v in zip(sc, (eid, scorer, (tpr + tnr) / 2, "openai:gpt-4o-mini", len(recs),
                         json.dumps({"examples": recs}), "test", 0.5, None, "run-demo", T0)):
        sc[k].append(v)


def _insert_explanations_and_scores(con, src: dict, seqs: list, acts: dict, dead: set[int],
                                    plant_of: dict, windows: dict, sim_cols: dict,
                                    rng: random.Random) -> int:
    """An LLM and a baseline explanation of each live feature (and a failed one of some), scored;
    the simulations go to `sim_cols`. The number of explanations."""
    exp = {k: [] for k in ("explanation_id", "source_id", "feature_id", "text", "explainer", "method",
                           "run_id", "created_at", "candidate", "chosen", "status")}
    sc = {k: [] for k in ("explanation_id", "scorer", "value", "simulator", "n_examples", "details",
                          "split", "baseline_shuffled", "baseline_tokens", "run_id", "created_at")}
    n_expl = 0
    for f in range(src["width"]):
        if f in dead:
            continue
        plant = plant_of[f]
        cands = [(plant.explanation, "openai:gpt-4o-mini", "pairs", "ok"),
                 (f'the tokens {plant.name!r} and similar', "baseline:tokens", "tokens", "ok")]
        if f % 6 == 2:
            cands.append(("", "anthropic:claude-3-5-haiku", "highlighted", "failed"))
        for c, (text, explainer, method, status) in enumerate(cands):
            eid = f"{src['source_id']}-f{f}-c{c}"
            n_expl += 1
            for k, v in zip(exp, (eid, src["source_id"], f, text, explainer, method, "run-demo",
                                  T0 + timedelta(seconds=n_expl), c, c == 0, status)):
                exp[k].append(v)
            if status != "ok":
                continue
            quality = 0.9 if c == 0 else 0.55
            for split in ("valid", "test"):
                _simulation_score(sc, sim_cols, eid, split, quality, plant, seqs, acts[f],
                                  windows.get(f, []), rng)
            for scorer in ("detection", "fuzzing"):
                _detection_score(sc, eid, scorer, windows.get(f, []), rng)
    insert_arrow(con, "explanations", exp)
    insert_arrow(con, "scores", sc)
    return n_expl


def build_demo_db(path: str, seed: int = 0) -> dict:
    """Fill a new database at `path`; return a summary of what went in (for the tests)."""
    rng = random.Random(seed)  # one stream, drawn from in a fixed order: the database depends on it
    con = open_db(path)
    try:
        seqs, n_tokens = _insert_sequences(con)
        summary = {"sources": {}, "n_tokens": n_tokens}
        sim_cols = {k: [] for k in ("explanation_id", "simulator", "seq_id", "start_pos", "split",
                                     "true_acts", "predicted", "kind")}
        for src in SOURCES:
            width = src["width"]
            dead = {width - 1, width - 5}  # two features that never fire
            plant_of, acts = _plant_activations(src, seqs, dead, rng)
            _insert_activations_and_features(con, src, acts, n_tokens)
            windows = _insert_examples(con, src, seqs, acts, dead, rng)
            n_expl = _insert_explanations_and_scores(con, src, seqs, acts, dead, plant_of, windows,
                                                     sim_cols, rng)
            summary["sources"][src["source_id"]] = {"width": width, "dead": sorted(dead), "n_explanations": n_expl}
        insert_arrow(con, "simulations", sim_cols)
    finally:
        con.close()
    return summary


def build_large_db(path: str, n_features: int, source_id: str = "8-res-sae1m", windows: int = 4,
                   window_len: int = 16) -> None:
    """Many features made in SQL: 5 activations, `windows` example windows (3 top, then random),
    1 explanation and 1 simulation score each."""
    con = open_db(path)
    try:
        n_seq, ctx = 256, 64
        con.execute(f"""
            INSERT INTO sources (source_id, model_id, hook_name, layer, kind, width, site, threshold)
            VALUES ('{source_id}', 'org/Big-Model-1B', 'model.layers.8', 8, 'sae', {n_features}, 'resid', 0)""")
        con.execute(f"""
            INSERT INTO sequences (seq_id, token_ids, tokens)
            SELECT s, list_transform(range({ctx}), lambda i: CAST((s * 31 + i * 7) % 5000 AS INTEGER)),
                   list_transform(range({ctx}), lambda i: ' w' || ((s * 31 + i * 7) % 5000))
            FROM range({n_seq}) t(s)""")
        insert_activations_query(con, source_id, f"""
            SELECT f, (f * 7 + k * 13) % {n_seq}, (f * 3 + k * 11) % {ctx},
                   CAST(1 + ((f * 17 + k * 5) % 97) / 10.0 AS REAL)
            FROM range({n_features}) a(f), range(5) b(k)""")
        con.execute(f"""
            INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act, status)
            SELECT source_id, feature_id, count(*), count(*) / {n_seq * ctx}.0, max(act), avg(act), 'ok'
            FROM activations WHERE source_id = '{source_id}' GROUP BY ALL""")
        con.execute(f"""
            INSERT INTO examples (source_id, feature_id, seq_id, start_pos, end_pos, split, kind, rank)
            SELECT '{source_id}', f, (f * 7 + k * 13) % {n_seq}, 0, {window_len},
                   ['explain', 'valid', 'test', 'test'][k % 4 + 1], CASE WHEN k < 3 THEN 'top' ELSE 'random' END, k
            FROM range({n_features}) a(f), range({windows}) b(k)""")
        con.execute(f"""
            INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method, created_at)
            SELECT 'e' || f, '{source_id}', f, 'tokens like w' || (f % 5000), 'baseline:tokens', 'tokens',
                   TIMESTAMP '2025-01-01 00:00:00'
            FROM range({n_features}) t(f)""")
        con.execute("""
            INSERT INTO scores (explanation_id, scorer, value, simulator, n_examples, split,
                                baseline_shuffled, baseline_tokens, details)
            SELECT explanation_id, 'simulation', (feature_id % 100) / 100.0, 'lexical', 32, 'test',
                   0.01, 0.2, '{"n_tokens": 32}'
            FROM explanations""")
    finally:
        con.close()
