"""The numbers the scorers report: correlation, balanced accuracy, AUC. Never NaN.

`correlation` is the simulation score of Bills et al. 2023 (`ev_correlation_score`): the Pearson
correlation of two flat arrays, here the true raw activations and the simulated ones of every
held-out window concatenated. A constant array has no correlation; we report 0 with a flag
instead of NaN, so the `scores` table never holds NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Correlation:
    value: float  # Pearson r, or 0.0 when undefined
    flag: str | None = None  # None | 'constant_true' | 'constant_predicted' | 'empty'


def correlation(true: Sequence[float] | np.ndarray, predicted: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson correlation of two equal-length arrays, 0 with a flag where it is undefined."""
    t = np.asarray(true, dtype=np.float64).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and predicted differ in length: {t.size} != {p.size}")
    if t.size < 2:
        return Correlation(0.0, "empty")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("activations must be finite")
    # a range test rather than std == 0: float noise must not turn a constant into a correlation
    if np.ptp(t) <= 1e-12 * max(1.0, float(np.abs(t).max())):
        return Correlation(0.0, "constant_true")
    if np.ptp(p) <= 1e-12 * max(1.0, float(np.abs(p).max())):
        return Correlation(0.0, "constant_predicted")
    r = float(np.corrcoef(t, p)[0, 1])
    if not np.isfinite(r):  # pragma: no cover - guarded above
        return Correlation(0.0, "undefined")
    return Correlation(max(-1.0, min(1.0, r)))


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> tuple[float, dict]:
    """Mean of the true-positive and true-negative rates; a missing class counts as chance (0.5).

    Returns the value and the confusion counts.
    """
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    tp = int((t & p).sum())
    tn = int((~t & ~p).sum())
    fp = int((~t & p).sum())
    fn = int((t & ~p).sum())
    rates = []
    flag = None
    if tp + fn:
        rates.append(tp / (tp + fn))
    if tn + fp:
        rates.append(tn / (tn + fp))
    if len(rates) == 2:
        value = (rates[0] + rates[1]) / 2
    else:
        value, flag = 0.5, "one_class"
    counts = {"tp": tp, "tn": tn, "fp": fp, "fn": fn}
    if flag:
        counts["flag"] = flag
    return float(value), counts


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return 0.5
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
