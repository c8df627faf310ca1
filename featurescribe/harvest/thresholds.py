"""Which entries a harvest keeps: a fixed threshold, or one that keeps a fraction of the first batch."""

from __future__ import annotations

import math

from featurescribe.errors import BadOption

DEFAULT_AUTO_KEEP = 0.01  # `--threshold auto`: keep about 1% of a neuron site's entries
SAMPLE = 1 << 18  # entries the estimate reads: at 1% kept, its relative error is about 2%


def parse_threshold(spec) -> tuple[str, float]:
    """('abs', value) | ('keep', fraction). Accepts a number, 'auto' (keep 1%) or 'N%' (keep N%)."""
    s = str(spec).strip().lower()
    if s == "auto":
        return "keep", DEFAULT_AUTO_KEEP
    try:
        if s.endswith("%"):
            frac = float(s[:-1]) / 100
            if not 0 < frac < 1:
                raise ValueError
            return "keep", frac
        value = float(spec) if isinstance(spec, (int, float)) else float(s)
        if not math.isfinite(value):  # nan or inf keeps nothing at all
            raise ValueError
        return "abs", value
    except ValueError:
        raise BadOption(f"bad --threshold {spec!r}: use a finite number, 'auto' (keep about 1% "
                                 "of entries) or a percentage like '2%'") from None


def auto_threshold(acts, keep: float) -> float:
    """The value above which about `keep` of the entries of `acts` lie (never below 0).

    Estimated on a sample of at most SAMPLE entries taken with a stride coprime to the feature count,
    so every feature is represented (a stride that divides it would read the same few features)."""
    import torch

    x = acts.float().reshape(-1)
    if x.numel() == 0:
        return 0.0
    if x.numel() > SAMPLE:
        step = x.numel() // SAMPLE + 1
        while math.gcd(step, int(acts.shape[-1])) != 1:
            step += 1
        x = x[::step]
    k = max(1, int(round(keep * x.numel())))
    v = float(torch.kthvalue(x, x.numel() - k + 1).values)  # the k-th largest (a selection, not a sort)
    v = max(v, 0.0)
    return float(f"{v:.4g}")
