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
