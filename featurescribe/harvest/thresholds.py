"""Which entries a harvest keeps: a fixed threshold, or one that keeps a fraction of the first batch."""

from __future__ import annotations

from featurescribe.errors import BadOption

DEFAULT_AUTO_KEEP = 0.01  # `--threshold auto`: keep about 1% of a neuron site's entries


def parse_threshold(spec) -> tuple[str, float]:
    """('abs', value) | ('keep', fraction). Accepts a number, 'auto' (keep 1%) or 'N%' (keep N%)."""
    if isinstance(spec, (int, float)):
        return "abs", float(spec)
    s = str(spec).strip().lower()
    if s == "auto":
        return "keep", DEFAULT_AUTO_KEEP
    try:
        if s.endswith("%"):
            frac = float(s[:-1]) / 100
            if not 0 < frac < 1:
                raise ValueError
            return "keep", frac
        return "abs", float(s)
    except ValueError:
        raise BadOption(f"bad --threshold {spec!r}: use a number, 'auto' (keep about 1% of "
                                 "entries) or a percentage like '2%'") from None


def auto_threshold(acts, valid, keep: float) -> float:
    """The value above which about `keep` of the valid entries lie (never below 0)."""
    import torch

    x = acts[valid].float().flatten()
    if x.numel() == 0:
        return 0.0
    if x.numel() > (1 << 24):  # a strided sample is plenty for a quantile
        x = x[:: x.numel() // (1 << 24) + 1]
    k = max(1, int(round(keep * x.numel())))
    v = float(torch.kthvalue(x, x.numel() - k + 1).values)  # the k-th largest (a selection, not a sort)
    v = max(v, 0.0)
    return float(f"{v:.4g}")
