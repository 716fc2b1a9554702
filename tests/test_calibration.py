"""Temperature scaling and the reject option, on synthetic predictions with known properties."""

import numpy as np
import pytest

from finetune.evaluation.calibration import brier_score, fit_temperature, negative_log_likelihood
from finetune.inference.predictions import Predictions
from finetune.inference.reject import risk_coverage, threshold_for_accuracy
from finetune.inference.task import SingleLabel

softmax = SingleLabel().probs  # the single-label task's probabilities


def _overconfident(seed=0, n=600, classes=4, scale=6.0):
    """Logits of a model that is right about 70% of the time but speaks as if it were always sure."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), targets] += 1.2
    return logits * scale, targets


def test_temperature_scaling_lowers_nll_and_keeps_every_argmax():
    logits, targets = _overconfident()
    t = fit_temperature(logits, targets)
    assert t > 2  # an over-confident model is cooled down
    before, after = softmax(logits), softmax(logits / t)
    assert negative_log_likelihood(after, targets) < 0.8 * negative_log_likelihood(before, targets)
    assert brier_score(after, targets) < brier_score(before, targets)
    assert (after.argmax(1) == before.argmax(1)).all()
    calibrated = Predictions.from_logits([""] * len(targets), logits, targets, temperature=t)
    assert np.allclose(calibrated.probs, after) and (calibrated.predicted == before.argmax(1)).all()


def test_a_well_calibrated_model_keeps_a_temperature_near_one():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 3)) * 2
    probs = softmax(logits)
    targets = np.array([rng.choice(3, p=p) for p in probs])  # labels drawn from the model's own probabilities
    assert fit_temperature(logits, targets) == pytest.approx(1.0, abs=0.1)


def test_reject_threshold_meets_its_target_on_the_split_it_was_fitted_on():
    logits, targets = _overconfident(seed=2, scale=1.5)
    probs = softmax(logits)
    for target in (0.75, 0.85, 0.95):
        rule = threshold_for_accuracy(probs, targets, target)
        kept = probs.max(1) >= rule.threshold
        assert (probs.argmax(1)[kept] == targets[kept]).mean() >= target
        assert rule.coverage == pytest.approx(kept.mean()) and rule.accuracy >= target
        looser = np.unique(probs.max(1)[~kept])
        if len(looser):  # any lower threshold (answering more) would miss the target: coverage is maximal
            t = looser.max()
            wider = probs.max(1) >= t
            assert (probs.argmax(1)[wider] == targets[wider]).mean() < target
    curve = risk_coverage(probs, targets)
    assert curve["coverage"].is_monotonic_increasing and curve["coverage"].iloc[-1] == 1.0
    assert curve["answered"].iloc[-1] == len(targets)
    assert np.allclose(curve["answered"] / len(targets), curve["coverage"])
    assert threshold_for_accuracy(probs, targets, 1.01) is None
