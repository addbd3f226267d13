"""Change points on synthetic, seeded nightly histories: a 5% step after 10 nights is found at the
right commit, pure noise and one noisy night give no step, and a 1% step inside 3% noise is not
claimed. Each claim is counted over many seeds, so the test measures a rate, not one lucky draw."""
import numpy as np

from bench.results import changepoints
from test_history import nights, sha

THRESHOLD = 0.03  # the compare threshold a sweep has by default


def noisy(seed: int, count: int, noise: float, step_at: int | None = None, step: float = 0.0):
    medians = np.exp(np.random.default_rng(seed).normal(0.0, noise, count))
    if step_at is not None:
        medians[step_at:] *= 1 + step
    return medians


def claims(series) -> int:
    return sum(bool(changepoints.step_indices(s, THRESHOLD)) for s in series)


def test_a_5_percent_step_after_10_nights_is_pinned_to_its_commit():
    exact = sum(changepoints.step_indices(noisy(seed, 20, 0.01, 10, 0.05), THRESHOLD) == [10]
                for seed in range(50))
    assert exact >= 45, f"found at night 10 in {exact} of 50 histories"

    history = nights(20, medians=noisy(7, 20, 0.01, 10, 0.05))
    steps = changepoints.find_steps(history, THRESHOLD)
    assert len(steps) == 3, "each case of the history steps"
    step = steps[0]
    assert step.index == 10 and step.sha == sha(10) and step.previous_sha == sha(9)
    assert 0.03 < step.change < 0.07 and step.date.startswith("2026-01-11")
    assert step.describe() == f"slower by {step.change:.1%} since 0010ffffff (2026-01-11)"
    assert changepoints.standing_regressions(steps) == steps


def test_30_nights_of_noise_give_no_step():
    assert claims(noisy(seed, 30, 0.01) for seed in range(100)) <= 1
    assert claims(noisy(seed, 30, 0.03) for seed in range(100)) <= 1


def test_a_1_percent_step_inside_3_percent_noise_is_not_claimed():
    assert claims(noisy(seed, 30, 0.03, 15, 0.01) for seed in range(100)) <= 3


def test_one_noisy_night_is_not_a_step():
    spiked = []
    for seed in range(100):
        s = noisy(seed, 30, 0.01)
        s[15] *= 1.25
        spiked.append(s)
    assert claims(spiked) == 0


def test_a_fix_after_a_regression_leaves_nothing_standing():
    medians = np.concatenate([noisy(1, 10, 0.01), noisy(2, 8, 0.01) * 1.08, noisy(3, 8, 0.01)])
    steps = changepoints.find_steps(nights(26, medians=medians), THRESHOLD)
    assert [s.index for s in steps[:2]] == [10, 18] and steps[1].change < 0
    assert changepoints.standing_regressions(steps) == []
