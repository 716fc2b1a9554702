"""95% intervals: Wilson's formula, bootstrap coverage in a simulation, and the paired test between two runs."""

import math

import numpy as np
import pytest

from finetune.evaluation.intervals import Z95, bootstrap_intervals, paired_difference, wilson_interval


def _wilson_by_hand(x, n, z=Z95):
    p = x / n
    denominator = 1 + z**2 / n
    centre = p + z**2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return (centre - spread) / denominator, (centre + spread) / denominator


@pytest.mark.parametrize(("x", "n"), [(81, 100), (1, 10), (77, 120), (150, 150)])
def test_wilson_interval_matches_the_formula(x, n):
    assert wilson_interval(x, n) == pytest.approx(_wilson_by_hand(x, n), abs=1e-12)


def test_wilson_edge_cases():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z95**2 / (10 + Z95**2))  # the closed form at p = 0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _synthetic(seed, n_per_class=50, classes=3, accuracy=0.8):
    """A classifier that is right with probability `accuracy` on every class; wrong answers spread evenly."""
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(classes), n_per_class)
    right = rng.random(len(targets)) < accuracy
    wrong = (targets + rng.integers(1, classes, len(targets))) % classes
    return targets, np.where(right, targets, wrong)


def test_intervals_cover_the_true_accuracy_in_about_95_percent_of_test_sets():
    true = 0.8  # balanced accuracy equals accuracy here: every class has the same size and the same accuracy
    covered = {"accuracy": 0, "balanced_accuracy": 0}
    seeds = 200
    for seed in range(seeds):
        targets, predicted = _synthetic(seed, accuracy=true)
        intervals = bootstrap_intervals(targets, predicted, 3, resamples=1000, seed=seed)
        for name in covered:
            low, high = intervals[name]
            covered[name] += low <= true <= high
    for name, hits in covered.items():
        assert 0.89 <= hits / seeds <= 0.99, (name, hits / seeds)


def test_per_class_intervals_contain_the_point_estimates():
    targets, predicted = _synthetic(3)
    intervals = bootstrap_intervals(targets, predicted, 3)
    for name in ("precision", "recall", "f1"):
        assert all(lo <= hi for lo, hi in intervals[f"per_class_{name}"])
    recall = [(predicted[targets == c] == c).mean() for c in range(3)]
    assert all(lo <= r <= hi for r, (lo, hi) in zip(recall, intervals["per_class_recall"]))


def test_paired_difference_tells_noise_from_a_real_gain():
    targets, a = _synthetic(1, n_per_class=100, accuracy=0.75)
    same = paired_difference(targets, a, a.copy(), 3)
    assert all(d.observed == 0 and not d.significant and d.verdict == "within noise" for d in same)
    better = a.copy()
    fix = np.flatnonzero(a != targets)[: len(targets) // 5]  # B repairs 20% of the images: a real gain
    better[fix] = targets[fix]
    gains = {d.metric: d for d in paired_difference(targets, a, better, 3)}
    assert gains["accuracy"].significant and gains["accuracy"].verdict == "B better"
    assert gains["accuracy"].observed == pytest.approx(len(fix) / len(targets))
    tiny = a.copy()
    tiny[fix[:1]] = targets[fix[:1]]  # one image: within the noise of 300
    assert not {d.metric: d for d in paired_difference(targets, a, tiny, 3)}["accuracy"].significant
