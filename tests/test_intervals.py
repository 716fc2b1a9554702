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


def _all_at_once(targets, predicted, classes, resamples, seed):
    """The bootstrap as first written: every (resample x image) index drawn at once, then one bincount."""
    rng = np.random.default_rng(seed)
    rows = np.empty((resamples, len(targets)), dtype=np.int64)
    start = 0
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        rows[:, start : start + len(members)] = members[rng.integers(0, len(members), (resamples, len(members)))]
        start += len(members)
    cells = targets[rows] * classes + predicted[rows] + np.arange(resamples)[:, None] * classes * classes
    return np.bincount(cells.ravel(), minlength=resamples * classes * classes).reshape(resamples, classes, classes)


@pytest.mark.parametrize("block", [7, 1000, 1 << 22])
def test_bootstrap_drawn_in_blocks_equals_drawing_all_at_once(monkeypatch, block):
    from finetune.evaluation import intervals

    monkeypatch.setattr(intervals, "BLOCK", block)
    targets, predicted = _synthetic(3, n_per_class=37, classes=4, accuracy=0.7)
    targets, predicted = targets[:-5], predicted[:-5]  # unequal classes
    other = np.roll(predicted, 3)
    got = intervals.stratified_confusions(targets, [predicted, other], 4, resamples=301, seed=5)
    assert np.array_equal(got[0], _all_at_once(targets, predicted, 4, 301, 5))
    assert np.array_equal(got[1], _all_at_once(targets, other, 4, 301, 5))  # the same resamples for both (paired)


def test_bootstrap_memory_does_not_grow_with_resamples_times_images():
    """2,000 resamples of 100,000 images drawn at once are 1.6 GB of indices (and 7 GB at 150,000 test images, the peak
    of a 1M-image training call's report); block by block a few times BLOCK."""
    import tracemalloc

    from finetune.evaluation.intervals import BLOCK

    targets, predicted = _synthetic(0, n_per_class=50_000, classes=2)
    tracemalloc.start()
    try:
        found = bootstrap_intervals(targets, predicted, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * BLOCK * 8 < 2000 * len(targets) * 8 / 10
    low, high = found["macro_f1"]
    assert low < 0.8 < high and high - low < 0.01
