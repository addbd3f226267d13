"""Statistics over raw per-rep samples. Everything downstream (summary, report, compare) recomputes
from stored samples through these functions, so a run is never re-run to be re-interpreted."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def median_ci(samples, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    The ranks come from the binomial(n, 1/2) quantiles, so no normality is assumed: timing samples
    are skewed and have outliers. Returns (nan, nan) for fewer than 2 samples.
    """
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    lo = int(sps.binom.ppf(alpha / 2, n, 0.5))
    hi = int(sps.binom.isf(alpha / 2, n, 0.5))
    return float(x[max(lo - 1, 0)]), float(x[min(hi, n - 1)])


def ci_rel(samples, confidence: float = 0.95) -> float:
    """Half-width of the median's confidence interval over the median: the noise-based stop rule."""
    lo, hi = median_ci(samples, confidence)
    med = float(np.median(samples)) if len(samples) else math.nan
    if math.isnan(lo) or med <= 0:
        return math.inf
    return (hi - lo) / 2 / med


def describe(samples) -> dict[str, float]:
    """n, median, mean, iqr, ci_low, ci_high, min of per-rep times (NaN where undefined)."""
    x = np.asarray(samples, dtype=float)
    if x.size == 0:
        nan = math.nan
        return dict(n=0, median=nan, mean=nan, iqr=nan, ci_low=nan, ci_high=nan, min=nan)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    lo, hi = median_ci(x)
    return dict(n=int(x.size), median=float(med), mean=float(x.mean()), iqr=float(q3 - q1),
                ci_low=lo, ci_high=hi, min=float(x.min()))
