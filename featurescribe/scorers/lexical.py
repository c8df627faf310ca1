"""Reading an explanation as a token rule, without an LLM.

An explanation such as `the tokens " def", " class" and " return"` names its tokens in quotes.
`LexicalRule.from_explanation` collects the strings an explanation quotes (double quotes,
backticks, single quotes around a whole word or symbol) and the few token classes it may name in
words (digits, capitalised words, punctuation). `LexicalRule.mask(tokens)` marks the tokens of a
window that match: a token matches a quoted string when their stripped, lower-cased texts are
equal, and a run of up to eight consecutive tokens matches a quoted phrase the same way.

This is the offline judge for lexical features: the `lexical` simulator, and the lexical judge of
detection and fuzzing. It cannot read context ("text inside brackets"), and says so by matching
nothing.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

# "..." or “...”, `...`, and '...' when the quote marks stand at word edges (not don't / it's)
_DOUBLE = re.compile(r'"([^"\n]{1,64})"|\u201c([^\u201d\n]{1,64})\u201d')
_BACKTICK = re.compile(r"`([^`\n]{1,64})`")
_SINGLE = re.compile(r"(?:(?<=^)|(?<=[\s(\[,:;]))'([^'\n]{1,64})'(?=$|[\s)\].,;:!?])")

# token classes an explanation may name in words: name -> (pattern over the explanation, test)
_CLASS_PATTERNS = {
    "digits": re.compile(r"\b(digits?|numbers?|numerals?|numeric)\b", re.I),
    "capitalized": re.compile(r"\b(capitali[sz]ed|upper-?case (?:initial|first)|capital letters?)\b", re.I),
    "punctuation": re.compile(r"\bpunctuation\b", re.I),
}

MAX_PHRASE_TOKENS = 8


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip().lower()


def _is_digits(tok: str) -> bool:
    s = tok.strip()
    return bool(s) and s.isdigit()


def _is_capitalized(tok: str) -> bool:
    s = tok.strip()
    return len(s) > 0 and s[0].isupper() and s[0].isalpha()


def _is_punct(tok: str) -> bool:
    s = tok.strip()
    return bool(s) and all(unicodedata.category(c).startswith("P") for c in s)


_CLASS_TESTS = {"digits": _is_digits, "capitalized": _is_capitalized, "punctuation": _is_punct}


def quoted_strings(explanation: str) -> list[str]:
    """The strings an explanation quotes, in order, without duplicates (normalised)."""
    found: list[str] = []
    for pat in (_DOUBLE, _BACKTICK, _SINGLE):
        for m in pat.finditer(explanation):
            raw = next(g for g in m.groups() if g is not None)
            s = _norm(raw)
            if s and s not in found:
                found.append(s)
    return found


@dataclass
class LexicalRule:
    strings: list[str] = field(default_factory=list)  # normalised quoted strings
    classes: list[str] = field(default_factory=list)  # named token classes

    @classmethod
    def from_explanation(cls, explanation: str) -> "LexicalRule":
        strings = quoted_strings(explanation)
        # named classes count only outside the quotes ("the word 'numbers'" names a word)
        unquoted = _BACKTICK.sub(" ", _DOUBLE.sub(" ", _SINGLE.sub(" ", explanation)))
        classes = [name for name, pat in _CLASS_PATTERNS.items() if pat.search(unquoted)]
        return cls(strings=strings, classes=classes)

    @property
    def empty(self) -> bool:
        return not self.strings and not self.classes

    def mask(self, tokens: list[str]) -> list[bool]:
        """Which tokens of a window the rule marks."""
        n = len(tokens)
        out = [False] * n
        if self.empty:
            return out
        norm = [_norm(t) for t in tokens]
        wanted = set(self.strings)
        for i, t in enumerate(norm):
            if t and t in wanted:
                out[i] = True
        phrases = [s for s in self.strings if len(s) > 1]
        if phrases:
            longest = max(len(s) for s in phrases)
            for i in range(n):
                if not norm[i]:
                    continue  # a phrase starts and ends on a token with text, not on spaces
                text = ""
                for j in range(i, min(n, i + MAX_PHRASE_TOKENS)):
                    text += tokens[j]
                    t = _norm(text)
                    if len(t) > longest:
                        break
                    if j > i and norm[j] and t in wanted:
                        for k in range(i, j + 1):
                            out[k] = True
        for name in self.classes:
            test = _CLASS_TESTS[name]
            for i, tok in enumerate(tokens):
                if test(tok):
                    out[i] = True
        return out
