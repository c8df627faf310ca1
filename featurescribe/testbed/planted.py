"""A planted-feature test bed: features defined by known rules, with their true explanations.

Each planted feature is a rule over the tokens of a real text (digits, a given word, capitalised
words, text inside brackets, ...) that gives every token an activation, and a sentence that says
what the rule is. `build_bed` tokenizes a corpus (the `smollm2-135m` tokenizer when it is
available, else a small word-level tokenizer needing nothing), applies every rule, and samples
for each feature top and random windows in three disjoint splits (`explain`, `valid`, `test`;
no window is in two splits), as the real sampler does, as `FeatureExamples`.

`PlantedBed.explanations()` gives every feature its true explanation and every other plant's
explanation as mismatched candidates; a judge is good when it scores the true one above the
mismatched ones (`ranking_auc`). Lexical plants are those a token list can describe; contextual
plants (text inside brackets) need a reader of context.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from featurescribe.records import Explanation, FeatureExamples, ScoreResult, Window

SOURCE_ID = "planted"

Rule = Callable[[list[str]], list[float]]


# ----------------------------------------------------------------------------- rules
def _per_token(test: Callable[[str], bool]) -> Rule:
    return lambda tokens: [1.0 if test(t) else 0.0 for t in tokens]


def _word(*words: str) -> Rule:
    wanted = {w.lower() for w in words}
    return _per_token(lambda t: t.strip().lower() in wanted)


def _inside_brackets(open_: str = "(", close: str = ")") -> Rule:
    def rule(tokens: list[str]) -> list[float]:
        out, depth = [], 0
        for t in tokens:
            has_bracket = open_ in t or close in t
            out.append(1.0 if depth > 0 and not has_bracket and t.strip() else 0.0)
            depth = max(0, depth + t.count(open_) - t.count(close))
        return out

    return rule


def _after(marker: Callable[[str], bool]) -> Rule:
    def rule(tokens: list[str]) -> list[float]:
        return [1.0 if i > 0 and marker(tokens[i - 1]) and tokens[i].strip() else 0.0
                for i in range(len(tokens))]

    return rule


@dataclass
class PlantedFeature:
    feature_id: int
    name: str
    explanation: str  # the true explanation
    rule: Rule
    lexical: bool  # a list of tokens describes it (the `lexical` judge can read it)


def default_plants() -> list[PlantedFeature]:
    s = lambda t: t.strip()  # noqa: E731
    plants = [
        ("digits", "numbers written with digits", lambda t: s(t).isdigit() and s(t).isascii(), True),
        ("the", 'the word "the"', None, True),
        ("is", 'the word "is"', None, True),
        ("self", 'the word "self"', None, True),
        ("capitalised", "capitalized words, that is words starting with a capital letter",
         lambda t: len(s(t)) > 1 and s(t)[0].isupper() and s(t).isalpha(), True),
        ("comma", 'the comma ","', None, True),
        ("keywords", 'the tokens " def", " class" and " return"', None, True),
        ("brackets", "text inside round brackets (parentheses)", None, False),
        ("after_dot", "the first token after a full stop or a dot", None, False),
    ]
    rules: dict[str, Rule] = {
        "the": _word("the"),
        "is": _word("is"),
        "self": _word("self"),
        "comma": _word(","),
        "keywords": _word("def", "class", "return"),
        "brackets": _inside_brackets(),
        "after_dot": _after(lambda t: t.strip() == "."),
    }
    out = []
    for i, (name, expl, test, lexical) in enumerate(plants):
        rule = rules.get(name) or _per_token(test)
        out.append(PlantedFeature(i, name, expl, rule, lexical))
    return out


# ----------------------------------------------------------------------------- tokenizers
_WORDS = re.compile(r" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\n|[ \t]+")


def word_tokenize(text: str) -> list[str]:
    """A tokenizer-free fallback: words with their leading space, single digits, single symbols."""
    return _WORDS.findall(text)


def smollm2_tokenize() -> Callable[[str], list[str]] | None:
    """The smollm2-135m tokenizer as text -> token strings, or None when it is not installed."""
    try:
        from featurescribe.harvest.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("smollm2-135m"))
    except Exception:  # noqa: BLE001 - any failure means: use the fallback
        return None

    def tokenize(text: str) -> list[str]:
        ids = tok(text, add_special_tokens=False).input_ids
        return [tok.decode([i]) for i in ids]

    tokenize.name = "smollm2-135m"  # type: ignore[attr-defined]
    return tokenize


def corpus_texts(max_chars: int = 400_000) -> list[str]:
    """Texts for the bed: the builtin corpus (the Python standard library's docstrings and code),
    falling back to a few generated paragraphs when the harvest's corpus reader is missing."""
    try:
        from featurescribe.harvest.corpus import open_corpus

        texts, n = [], 0
        for text, _ in open_corpus("builtin:stdlib").documents():
            texts.append(text)
            n += len(text)
            if n >= max_chars:
                break
        if texts:
            return texts
    except Exception:  # noqa: BLE001
        pass
    return _generated_texts(max_chars)


def _generated_texts(max_chars: int) -> list[str]:
    rng = random.Random(0)
    nouns = ["value", "list", "file", "Python", "object", "string", "number", "Table", "class", "result"]
    verbs = ["is", "returns", "holds", "reads", "makes", "is not", "gives"]
    out, n = [], 0
    while n < max_chars:
        parts = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(["The", "the", "A", "This"]), rng.choice(nouns), rng.choice(verbs),
                     rng.choice(["the", "a", "self", "each"]), rng.choice(nouns)]
            if rng.random() < 0.4:
                words.append(f"({rng.choice(nouns)} {rng.randint(0, 999)})")
            if rng.random() < 0.3:
                words.insert(3, ",")
            parts.append(" ".join(words) + ".")
        if rng.random() < 0.4:
            parts.append(f"\ndef {rng.choice(nouns).lower()}(self, x):\n    return x + {rng.randint(1, 99)}\n")
        text = " ".join(parts)
        out.append(text)
        n += len(text)
    return out


# ----------------------------------------------------------------------------- the bed
@dataclass
class PlantedBed:
    plants: list[PlantedFeature]
    examples: dict[tuple[str, int], FeatureExamples]
    tokenizer: str
    n_tokens: int

    def plant(self, feature_id: int) -> PlantedFeature:
        return next(p for p in self.plants if p.feature_id == feature_id)

    def explanations(self, features: Iterable[int] | None = None) -> list[Explanation]:
        """For each feature: its true explanation (candidate 0) and every other plant's
        explanation as a mismatched candidate; `method` says which is which."""
        ids = set(features) if features is not None else {p.feature_id for p in self.plants}
        out = []
        for p in self.plants:
            if p.feature_id not in ids or (SOURCE_ID, p.feature_id) not in self.examples:
                continue
            cands = [p] + [q for q in self.plants if q.feature_id != p.feature_id]
            for j, q in enumerate(cands):
                out.append(Explanation(
                    explanation_id=f"{SOURCE_ID}-{p.feature_id}-{q.name}",
                    source_id=SOURCE_ID, feature_id=p.feature_id, text=q.explanation,
                    explainer="planted", method="true" if j == 0 else "mismatched", candidate=j,
                ))
        return out


def _chunks(tokens: list[str], width: int) -> list[tuple[int, list[str]]]:
    return [(i, tokens[i:i + width]) for i in range(0, len(tokens) - width + 1, width)]


def build_bed(
    plants: Sequence[PlantedFeature] | None = None,
    *,
    tokenizer: str = "auto",
    max_tokens: int = 40_000,
    window: int = 32,
    n_top: dict[str, int] | None = None,
    n_random: dict[str, int] | None = None,
    seed: int = 0,
    amplitude_noise: float = 0.3,
    texts: Sequence[str] | None = None,
) -> PlantedBed:
    """Tokenize a corpus, plant the features, and sample their windows in disjoint splits.

    `tokenizer`: 'auto' (smollm2-135m when installed, else words), 'smollm2', or 'words'.
    Activations of a firing token are drawn in [1 - amplitude_noise, 1] times a per-feature scale,
    so the true arrays are not all one value. Features that fire in too few windows are left out.
    """
    plants = list(plants) if plants is not None else default_plants()
    n_top = n_top or {"explain": 10, "valid": 5, "test": 10}
    n_random = n_random or {"explain": 5, "valid": 5, "test": 10}
    tok_fn, tok_name = _tokenizer(tokenizer)
    stream = _token_stream(tok_fn, texts, max_tokens)
    chunks = _chunks(stream, window)
    examples: dict[tuple[str, int], FeatureExamples] = {}
    for p in plants:
        windows = _plant_windows(p, stream, chunks, window, n_top, n_random, seed, amplitude_noise)
        if windows:
            max_act = float(max(w.max_act for w in windows))
            examples[(SOURCE_ID, p.feature_id)] = FeatureExamples(SOURCE_ID, p.feature_id, max_act, windows)
    return PlantedBed(plants=plants, examples=examples, tokenizer=tok_name, n_tokens=len(stream))


def _tokenizer(tokenizer: str) -> tuple[Callable[[str], list[str]], str]:
    if tokenizer in ("auto", "smollm2"):
        tok_fn = smollm2_tokenize()
        if tok_fn is None and tokenizer == "smollm2":
            raise RuntimeError("the smollm2-135m tokenizer is not available")
        if tok_fn is not None:
            return tok_fn, "smollm2-135m"
    return word_tokenize, "words"


def _token_stream(tok_fn, texts: Sequence[str] | None, max_tokens: int) -> list[str]:
    stream: list[str] = []
    for text in texts if texts is not None else corpus_texts(max_chars=max_tokens * 6):
        stream.extend(tok_fn(text))
        stream.append("\n")
        if len(stream) >= max_tokens:
            break
    return stream[:max_tokens]


def _plant_windows(p: PlantedFeature, stream: list[str], chunks, window: int, n_top: dict[str, int],
                   n_random: dict[str, int], seed: int, amplitude_noise: float) -> list[Window]:
    """A plant's windows: its most active chunks dealt round-robin to the splits (disjoint), then
    random chunks; none when it fires in too few chunks."""
    rng = np.random.default_rng([seed, p.feature_id])
    scale = float(2.0 + p.feature_id % 5)  # features differ in their activation size
    acts_all = np.asarray(p.rule(stream), dtype=np.float64)
    acts_all = acts_all * (1.0 - amplitude_noise * rng.random(acts_all.size)) * scale
    chunk_acts = [acts_all[i:i + window] for i, _ in chunks]
    active = [k for k, a in enumerate(chunk_acts) if a.max() > 0]
    need_top = sum(n_top.values())
    if len(active) < need_top:
        return []
    active.sort(key=lambda k: (-chunk_acts[k].sum(), k))
    top = active[: need_top]
    used = set(top)
    rest = [k for k in range(len(chunks)) if k not in used]
    rng.shuffle(rest)
    order = ["explain", "valid", "test"]
    counts = {s: 0 for s in order}
    windows: list[Window] = []
    i = 0
    for k in top:
        while counts[order[i % 3]] >= n_top[order[i % 3]]:
            i += 1
        split = order[i % 3]
        counts[split] += 1
        i += 1
        windows.append(_window(chunks[k], chunk_acts[k], "top", split))
    pos = 0
    for split in order:
        windows += [_window(chunks[k], chunk_acts[k], "random", split) for k in rest[pos:pos + n_random[split]]]
        pos += n_random[split]
    return windows


def _window(chunk: tuple[int, list[str]], acts: np.ndarray, kind: str, split: str) -> Window:
    start, tokens = chunk
    # one long token stream: seq_id 0, windows told apart by their start position
    return Window(seq_id=0, start_pos=start, tokens=list(tokens), acts=[float(a) for a in acts],
                  kind=kind, split=split)


# ----------------------------------------------------------------------------- judging the judges
@dataclass
class Ranking:
    auc: float  # mean over features of P(true explanation scores above a mismatched one)
    per_feature: dict[int, float] = field(default_factory=dict)
    true_best: dict[int, bool] = field(default_factory=dict)  # true strictly above every mismatched


def ranking_auc(bed_explanations: Sequence[Explanation], results: Sequence[ScoreResult],
                scorer: str = "simulation", features: Iterable[int] | None = None) -> Ranking:
    """How well a scorer tells each feature's true explanation from the mismatched ones."""
    by_id = {r.explanation_id: r.value for r in results if r.scorer == scorer}
    wanted = set(features) if features is not None else None
    per: dict[int, float] = {}
    best: dict[int, bool] = {}
    groups: dict[int, list[Explanation]] = {}
    for e in bed_explanations:
        groups.setdefault(e.feature_id, []).append(e)
    for fid, exps in groups.items():
        if wanted is not None and fid not in wanted:
            continue
        true = [by_id[e.explanation_id] for e in exps if e.method == "true" and e.explanation_id in by_id]
        false = [by_id[e.explanation_id] for e in exps if e.method != "true" and e.explanation_id in by_id]
        if not true or not false:
            continue
        t = true[0]
        per[fid] = float(np.mean([1.0 if t > f else 0.5 if t == f else 0.0 for f in false]))
        best[fid] = all(t > f for f in false)
    auc = float(np.mean(list(per.values()))) if per else 0.5
    return Ranking(auc=auc, per_feature=per, true_best=best)


def noise_features(bed: PlantedBed, seed: int = 0) -> list[FeatureExamples]:
    """One uninterpretable feature per plant, for the intruder scorer: its activating windows are
    the plants' explain windows dealt round-robin (so no two share a rule), each active at one
    random token; its random windows are the plant's own (silent where the plant is)."""
    rng = random.Random(seed)
    plants = [bed.examples[k] for k in sorted(bed.examples)]
    pool = [w for fe in plants for w in fe.split("explain") if w.kind != "random" and w.tokens]
    out = []
    for i, fe in enumerate(plants):
        members = []
        for w in pool[i::len(plants)]:
            acts = [0.0] * len(w.tokens)
            acts[rng.randrange(len(w.tokens))] = 1.0
            members.append(Window(seq_id=w.seq_id, start_pos=w.start_pos, tokens=list(w.tokens), acts=acts,
                                  kind="top", split="explain"))
        out.append(FeatureExamples("noise", fe.feature_id, 1.0, members + [w for w in fe.windows if w.kind == "random"]))
    return out


def separation_auc(interpretable: Sequence[float], noise: Sequence[float]) -> float:
    """P(an interpretable feature scores above a noise feature), ties counting half."""
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in interpretable for b in noise]
    return float(np.mean(pairs)) if pairs else 0.5
