"""Neutral prompts, and the steering strength that moves the next token by a target KL.

The strength of an intervention is searched per feature so that every feature is pushed equally
hard: the mean over the neutral prompts of KL(p_steered || p_unsteered) of the next-token
distribution is brought to `target_kl` (nats). A geometric grid of strengths is tried in one
batch (with the unsteered rows), then the bracket around the target is bisected in log space.
The strength whose KL is nearest the target wins; the KL it reached is reported (a feature too
weak to reach the target at the grid's largest strength keeps that strength and says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from featurescribe.errors import FeaturescribeError
from featurescribe.steer.generate import Steerer
from featurescribe.steer.hooks import Intervention

DEFAULT_TARGET_KL = 2.0
GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BISECT_STEPS = 4



@lru_cache(maxsize=1)
def _all_neutral_prompts() -> tuple[str, ...]:
    from featurescribe.prompts import load_template

    lines = load_template("steer_neutral").splitlines()
    return tuple(x.strip() for x in lines if x.strip() and not x.startswith("#"))


def neutral_prompts(n: int) -> list[str]:
    """The first `n` neutral prompts (a fixed list, so every feature sees the same ones)."""
    prompts = _all_neutral_prompts()
    if not 1 <= n <= len(prompts):
        raise FeaturescribeError(f"the number of neutral prompts must be 1 to {len(prompts)}, not {n}")
    return list(prompts[:n])


@dataclass
class Calibration:
    strength: float
    kl: float
    target_kl: float
    reached: bool  # the target was bracketed (else the strength is the grid's largest)
    tried: list[tuple[float, float]] = field(default_factory=list)  # (strength, mean KL)

    def as_dict(self) -> dict:
        return {"strength": self.strength, "kl": self.kl, "target_kl": self.target_kl,
                "reached": self.reached, "tried": [[s, k] for s, k in self.tried]}


def mean_kl(steerer: Steerer, prompts: Sequence[str], intervention: Intervention,
            strengths: Sequence[float]) -> list[float]:
    """Mean over prompts of KL(p_steered || p_unsteered) of the next token, per strength, from one
    batch of len(prompts) * (len(strengths) + 1) rows."""
    n = len(prompts)
    rows = list(prompts) * (len(strengths) + 1)
    row_strengths: list[float | None] = [None] * n + [s for s in strengths for _ in range(n)]
    logp = steerer.next_logprobs(rows, intervention, row_strengths)
    base = logp[:n]
    out = []
    for i in range(len(strengths)):
        steered = logp[n * (i + 1): n * (i + 2)]
        kl = (steered.exp() * (steered - base)).sum(-1).clamp(min=0.0)
        out.append(float(kl.mean()))
    return out


def calibrate(steerer: Steerer, prompts: Sequence[str], intervention: Intervention,
              target_kl: float = DEFAULT_TARGET_KL, grid: Sequence[float] = GRID,
              steps: int = BISECT_STEPS) -> Calibration:
    """The strength whose mean next-token KL is nearest `target_kl` (see the module docstring)."""
    tried = list(zip(grid, mean_kl(steerer, prompts, intervention, list(grid))))
    above = [(s, k) for s, k in tried if k >= target_kl]
    if not above:
        s, k = max(tried, key=lambda t: t[0])
        return Calibration(s, k, target_kl, False, tried)
    hi = min(above, key=lambda t: t[0])
    below = [(s, k) for s, k in tried if s < hi[0] and k < target_kl]
    lo = max(below, key=lambda t: t[0]) if below else None
    for _ in range(steps if lo is not None else 0):
        mid = math.sqrt(lo[0] * hi[0])
        k = mean_kl(steerer, prompts, intervention, [mid])[0]
        tried.append((mid, k))
        if k >= target_kl:
            hi = (mid, k)
        else:
            lo = (mid, k)
    candidates = [hi] + ([lo] if lo is not None else [])
    s, k = min(candidates, key=lambda t: abs(math.log(max(t[1], 1e-9) / target_kl)))
    return Calibration(s, k, target_kl, True, tried)
