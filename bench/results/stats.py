"""Statistics over raw per-rep samples. Everything downstream (summary, report, compare) recomputes
from stored samples through these functions, so a run is never re-run to be re-interpreted."""
from __future__ import annotations

import math

import numpy as np
from scipy import special  # not scipy.stats: 0.4 s more to import in every worker

THRESHOLD = 0.03  # the relative change a comparison counts where the sweep names none


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
    lo, hi = _binom_half_ppf(alpha / 2, n), _binom_half_isf(alpha / 2, n)
    return float(x[max(lo - 1, 0)]), float(x[min(hi, n - 1)])


def _binom_half_ppf(q: float, n: int) -> int:
    """The least k with P(Binomial(n, 1/2) <= k) >= q (scipy.stats.binom.ppf)."""
    return int(np.searchsorted(special.bdtr(np.arange(n + 1), n, 0.5), q))


def _binom_half_isf(q: float, n: int) -> int:
    """The least k with P(Binomial(n, 1/2) > k) <= q (scipy.stats.binom.isf)."""
    return int(np.argmax(special.bdtrc(np.arange(n + 1), n, 0.5) <= q))


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


def false_alarm_rate(confidence: float) -> float:
    """The chance that a case that did not change is flagged a regression: its two-sided interval
    lies wholly above 1 with probability (1 - confidence) / 2 (the threshold and noise bound only
    lower it further), so a night of n cases expects n times this many false alarms."""
    return (1.0 - confidence) / 2


def detectable_change(ratio: float, ci_low: float, threshold: float, noise: float = 0.0) -> float:
    """The smallest slowdown the verdict rule would flag at this case's measured noise.

    A regression needs log r above log(1 + threshold), above the run-to-run noise bound and above
    the interval's lower reach log(r / low) (the interval moves with the ratio, its width set by the
    samples' scatter): so the largest of the three, as a relative change. NaN without an interval."""
    if not (ratio > 0 and ci_low > 0):
        return math.nan
    return math.expm1(max(math.log1p(threshold), noise, math.log(ratio / ci_low)))


def round_times(samples, reps, kind: str = "cuda") -> np.ndarray:
    """Each round's time from pooled samples and the per-round sample counts `reps` (A/B records):
    its median on a GPU; on a CPU its fastest rep, since a shared CPU only ever adds time (a rep
    descheduled, a neighbour on the core): under load, rounds' medians moved 2-5x while their
    minima moved a few percent (docs/regressions.md). Empty when the counts are missing or do not
    add up to the samples."""
    x = np.asarray(samples or [], dtype=float)
    if not reps or sum(reps) != x.size or min(reps) < 1:
        return np.array([])
    pick = np.min if kind == "cpu" else np.median
    return np.array([pick(part) for part in np.split(x, np.cumsum(reps)[:-1])])


def paired_ratio_ci(base_rounds, cur_rounds, confidence: float,
                    kind: str = "cuda") -> tuple[float, float, float]:
    """(ratio, low, high) from rounds measured in pairs (A B B A) of the per-round ratios cur/base:
    on a GPU their geometric mean with a Student t interval on their logs; on a CPU their median
    with the sign test's interval (order statistics of the logs), since a shared CPU's rounds have
    outliers a mean follows: in one A/A trial four rounds of 48 at 0.69-0.74 moved the geometric
    mean to 0.958 while the median stayed at 0.99 (docs/regressions.md).

    A round's two sides ran back to back, so a drift of the machine between rounds cancels within
    each pair; what is left, the scatter of the per-round log ratios, is what the interval is made
    of. (nan, nan) for the interval with too few rounds to reach `confidence` (2, or 8 at 99% for
    the sign test)."""
    d = np.log(np.asarray(cur_rounds, dtype=float) / np.asarray(base_rounds, dtype=float))
    if d.size == 0 or not np.isfinite(d).all():
        return math.nan, math.nan, math.nan
    if kind == "cpu":
        d.sort()
        mid = float(np.median(d))
        # the interval [d_k, d_(n+1-k)] misses the median with probability 2 P(Binomial(n, 1/2) < k)
        k = _binom_half_ppf((1 - confidence) / 2, d.size)
        if special.bdtr(k, d.size, 0.5) > (1 - confidence) / 2:
            k -= 1
        if k < 0:
            return math.exp(mid), math.nan, math.nan
        return math.exp(mid), math.exp(d[k]), math.exp(d[d.size - 1 - k])
    mean = float(d.mean())
    if d.size < 2:
        return math.exp(mean), math.nan, math.nan
    half = float(special.stdtrit(d.size - 1, 0.5 + confidence / 2) * d.std(ddof=1) / math.sqrt(d.size))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
