"""TokenChange output effects: which next tokens a feature makes likelier or rarer when steered.

Over the neutral prompts, the next-token distribution with the feature steered (at its
calibrated strength) is compared with the unsteered one; a token's change is its probability
difference averaged over the prompts. The `k` tokens that rise most and fall most are the
feature's output effects, stored beside `features.promoted_tokens` (`output_rising`,
`output_falling`) and shown to explainers that ask for output evidence (`label --output-effects`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from featurescribe.steer.generate import Steerer
from featurescribe.steer.hooks import Intervention


@dataclass
class OutputEffects:
    rising: list[str]
    falling: list[str]
    strength: float
    kl: float
    rising_delta: list[float] = field(default_factory=list)  # mean probability change of each
    falling_delta: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"strength": self.strength, "kl": self.kl, "rising": self.rising,
                "rising_delta": self.rising_delta, "falling": self.falling,
                "falling_delta": self.falling_delta}


def token_changes(steerer: Steerer, prompts: Sequence[str], intervention: Intervention,
                  strength: float, k: int = 10, kl: float = float("nan")) -> OutputEffects:
    """The `k` tokens whose mean next-token probability rises and falls most at `strength`."""
    n = len(prompts)
    logp = steerer.next_logprobs(list(prompts) * 2, intervention, [None] * n + [strength] * n)
    delta = (logp[n:].exp() - logp[:n].exp()).mean(0)
    up = delta.topk(k)
    down = (-delta).topk(k)
    dec = steerer.tokenizer.decode
    return OutputEffects(
        rising=[dec([int(t)]) for t in up.indices], falling=[dec([int(t)]) for t in down.indices],
        strength=float(strength), kl=float(kl),
        rising_delta=[round(float(v), 6) for v in up.values],
        falling_delta=[round(-float(v), 6) for v in down.values])


def compute_output_effects(source: dict, features: dict[int, float | None], k: int, *,
                           n_prompts: int, target_kl: float, on_pass=None) -> dict[int, OutputEffects]:
    """{feature: its OutputEffects} for a `sources` row; `features` maps id -> max activation.
    Each feature is steered at the strength calibrated to `target_kl` over `n_prompts` prompts."""
    from featurescribe.steer.calibrate import calibrate, neutral_prompts
    from featurescribe.steer.source import load_source_steering

    st = load_source_steering(source)
    prompts = neutral_prompts(n_prompts)
    out = {}
    with st.local.lock:
        for f, max_act in features.items():
            st.steerer.on_pass = (lambda *a, f=f: on_pass(f, *a)) if on_pass else None
            try:
                iv = st.intervention(f, max_act)
                cal = calibrate(st.steerer, prompts, iv, target_kl)
                out[f] = token_changes(st.steerer, prompts, iv, cal.strength, k, cal.kl)
            finally:
                st.steerer.on_pass = None
    return out


def attach_output_effects(con, source_id: str, examples: dict, k: int, *, n_prompts: int,
                          target_kl: float, run_id: str | None = None) -> None:
    """Each feature's k rising and falling tokens on its FeatureExamples: read from `features`
    when stored with at least k, else computed with the source's model and stored (each forward
    pass a ledger row, purpose `output_effects`)."""
    from featurescribe.scorers.intervention import ledger_hook
    from featurescribe.store.llm_calls import write_calls
    from featurescribe.store.steering import load_output_effects, save_output_effects, source_row

    have = load_output_effects(con, source_id, sorted(examples), k)
    missing = {f: examples[f].max_act for f in sorted(examples) if f not in have}
    if missing:
        source = source_row(con, source_id)
        rows = []
        hook = ledger_hook(_ListStore(rows), run_id, str(source["model_id"]), source_id, "output_effects")
        new = compute_output_effects(source, missing, k, n_prompts=n_prompts, target_kl=target_kl, on_pass=hook)
        save_output_effects(con, source_id, new)
        write_calls(con, rows, {})
        have.update({f: (e.rising, e.falling) for f, e in new.items()})
    for f, fe in examples.items():
        fe.output_rising, fe.output_falling = (list(x) for x in have[f])


class _ListStore:
    """Collects ledger rows in a list (they are written with the effects)."""

    def __init__(self, rows: list):
        self.rows = rows

    def record(self, row) -> None:
        self.rows.append(row)
