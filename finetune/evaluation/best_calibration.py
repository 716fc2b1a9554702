"""After training: the temperature (and, with several labels per image, each class's decision threshold) fitted on
best.pt's own validation outputs, with no image read again, and stored in best.pt for eval, predict and export."""

from __future__ import annotations

import logging
from typing import Any

from finetune.config.schema import EvalConfig
from finetune.evaluation.calibration import calibration_summary, fit_temperature
from finetune.evaluation.thresholds import choose_thresholds
from finetune.inference.checkpoint import VALIDATION_KEYS, load_checkpoint, save_checkpoint
from finetune.inference.predictions import Predictions
from finetune.inference.task import DEFAULT_TASK, MultiLabel, task_named
from finetune.run_dir import RunDir

log = logging.getLogger(__name__)


def _store_thresholds(payload: dict[str, Any], cfg: EvalConfig, preds: Predictions) -> None:
    """Several labels per image: each class's threshold, chosen on the calibrated validation probabilities."""
    table = choose_thresholds(
        preds.probs, preds.targets, list(payload["class_names"]), rule=cfg.threshold.rule, target=cfg.threshold.target
    )
    payload["thresholds"] = [float(t) for t in table["threshold"]]
    payload["threshold_rule"] = {"rule": cfg.threshold.rule, "target": cfg.threshold.target, "fitted_on": "val"}
    log.info(
        "per-class thresholds chosen on the validation split (%s): %s",
        cfg.threshold.rule,
        ", ".join(f"{name}: {threshold:.3f}" for name, threshold in zip(table["class"], table["threshold"])),
    )


def calibrate_best(run: RunDir, cfg: EvalConfig) -> float:
    """Fit the temperature on best.pt's own validation logits (no image is read again) and store it in best.pt; with
    several labels per image, also each class's decision threshold."""
    payload = load_checkpoint(run.best)
    if not all(key in payload for key in VALIDATION_KEYS):
        return float(payload.get("temperature", 1.0))
    task = task_named(str(payload.get("task", DEFAULT_TASK)))
    logits, targets = payload["val_logits"].numpy(), payload["val_targets"].numpy()
    if cfg.calibration == "off":
        if task.name == MultiLabel.name:
            _store_thresholds(payload, cfg, Predictions.from_logits([""] * len(targets), logits, targets, task=task))
            save_checkpoint(payload, run.best, resume=run.root)
        return float(payload.get("temperature", 1.0))
    temperature = fit_temperature(logits, targets, task)
    unscaled = Predictions.from_logits([""] * len(targets), logits, targets, task=task)
    if task.name == MultiLabel.name:
        _store_thresholds(payload, cfg, unscaled.with_temperature(temperature))
    payload["temperature"] = temperature
    payload["calibration"] = {
        "fitted_on": "val",
        "before": calibration_summary(unscaled),
        "after": calibration_summary(unscaled.with_temperature(temperature)),
    }
    save_checkpoint(payload, run.best, resume=run.root)
    log.info(
        "temperature %.3f fitted on the validation split (NLL %.4f -> %.4f)",
        temperature,
        payload["calibration"]["before"]["nll"],
        payload["calibration"]["after"]["nll"],
    )
    return temperature
