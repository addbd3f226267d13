"""Lasting steps in a case's series of nightly medians, each pinned to the first commit measured on
its far side (docs/regressions.md says why PELT, and why these settings).

The series is taken in log space, so a step is a ratio and one penalty serves fast and slow cases.
PELT (the `ruptures` library) places the change points, with a BIC-like penalty scaled by the
series' own night-to-night noise; a step is kept only when both sides last MIN_NIGHTS nights, the
change of the medians is past the threshold, and it stands out of that noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import ruptures

MIN_NIGHTS = 3  # a step is named once it has lasted this long: one noisy night is not a step
PENALTY = 3.0  # times noise variance times log(nights): well above what noise alone gains
MIN_Z = 4.0  # a step must be this many standard errors of its two sides' difference
NOISE_FLOOR = 0.002  # relative: no series is trusted to be quieter than this


@dataclass
class Step:
    """Night `index` of a case's series is the first on the new level."""
    hardware: str
    sweep: str
    case: str
    index: int
    sha: str  # first commit measured on the new level
    previous_sha: str  # last commit on the old one: the change is in previous_sha..sha
    date: str
    before_ms: float
    after_ms: float

    @property
    def change(self) -> float:
        return self.after_ms / self.before_ms - 1

    def describe(self) -> str:
        word = "slower" if self.change > 0 else "faster"
        return f"{word} by {abs(self.change):.1%} since {self.sha[:10]} ({self.date[:10]})"


def noise(logs: np.ndarray) -> float:
    """Night-to-night standard deviation from the median absolute successive difference: a step
    moves one difference only, so it barely counts."""
    diffs = np.diff(logs)
    mad = np.median(np.abs(diffs - np.median(diffs))) if len(diffs) else 0.0
    return max(1.4826 * mad / np.sqrt(2), NOISE_FLOOR)


def step_indices(medians, threshold: float) -> list[int]:
    """Indices i where the series steps (night i is the first on the new level) by more than
    `threshold` (relative), lasting at least MIN_NIGHTS nights on each side."""
    logs = np.log(np.asarray(medians, dtype=float))
    n = len(logs)
    if n < 2 * MIN_NIGHTS:
        return []
    sigma = noise(logs)
    ends = ruptures.Pelt(model="l2", min_size=MIN_NIGHTS, jump=1).fit(logs.reshape(-1, 1)).predict(
        pen=PENALTY * sigma ** 2 * np.log(n))
    bounds = [0, *ends]
    levels = np.concatenate([np.full(b - a, np.median(logs[a:b])) for a, b in zip(bounds, ends)])
    sigma = max(sigma, float(np.std(logs - levels, ddof=len(ends))))  # the noise around the levels
    kept = []
    for start, cut, end in zip(bounds, bounds[1:], bounds[2:]):
        before, after = logs[start:cut], logs[cut:end]
        shift = np.median(after) - np.median(before)
        # a median's standard error is about 1.25 sigma / sqrt(n) for normal noise
        z = abs(shift) / (1.25 * sigma * np.sqrt(1 / len(before) + 1 / len(after)))
        if abs(np.expm1(shift)) > threshold and z > MIN_Z:
            kept.append(cut)
    return kept


def find_steps(history: pd.DataFrame, threshold: float) -> list[Step]:
    """Every lasting step of every case in a history frame (bench.results.history.read), per GPU
    model and sweep, oldest first; only `ok` nights count."""
    ok = history[(history["status"] == "ok") & history["median_ms"].notna()]
    found = []
    for (gpu, sweep, case), g in ok.groupby(["hardware", "sweep", "case"], sort=True):
        g = g.sort_values("date", kind="stable").reset_index(drop=True)
        medians = g["median_ms"].to_numpy()
        bounds = [0, *step_indices(medians, threshold), len(g)]
        for start, cut, end in zip(bounds, bounds[1:-1], bounds[2:]):
            found.append(Step(gpu, sweep, case, cut, str(g["git_sha"][cut]),
                              str(g["git_sha"][cut - 1]), str(g["date"][cut]),
                              float(np.median(medians[start:cut])), float(np.median(medians[cut:end]))))
    return found


def standing_regressions(steps: list[Step]) -> list[Step]:
    """Steps to slower that still hold: the last step of their case, on its latest level."""
    last = {}
    for s in steps:
        last[(s.hardware, s.sweep, s.case)] = s
    return [s for s in last.values() if s.change > 0]
