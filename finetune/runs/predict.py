"""`finetune predict`: calibrated predictions for new images, with the reject option ('unknown' below a threshold)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.config.catalog import IMAGE_EXTENSIONS
from finetune.data.doctor import screen_samples
from finetune.data.scan import list_images
from finetune.deploy.package import image_batches
from finetune.deploy.runtime import Exported, is_exported, load_exported
from finetune.errors import CheckpointError, DataError, UsageError
from finetune.evaluation.inference import Predictions
from finetune.evaluation.metrics import predictions_table
from finetune.evaluation.reject import RejectRule, risk_coverage, threshold_for_accuracy
from finetune.files import check_writable_file, write_table, write_text
from finetune.run_dir import RunDir
from finetune.runs.evaluate import checkpoint_path, predict_paths
from finetune.training.checkpoint import LoadedModel, load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


def check_inputs_exist(inputs: Sequence[str | Path]) -> None:
    missing = next((item for item in map(Path, inputs) if not item.exists()), None)
    if missing is not None:
        raise DataError(f"input {missing} does not exist; pass image files or folders")


def input_paths(inputs: Sequence[str | Path], extensions: Sequence[str]) -> list[str]:
    """Files as given, and images in folders (recursive, with the run's extensions)."""
    paths: list[str] = []
    for item in map(Path, inputs):
        paths += [str(p) for p in list_images(item, extensions)] if item.is_dir() else [str(item)]
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(extensions)})")
    return paths


def _check_reject_options(min_confidence: float | None, reject: str | None, target_accuracy: float | None) -> None:
    if min_confidence is not None and reject is not None:
        raise UsageError("give --min-confidence P or --reject auto --target-accuracy A, not both")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"--min-confidence {min_confidence}: a probability from 0 to 1, e.g. 0.8")
    if reject is not None and reject != "auto":
        raise UsageError(f"--reject {reject}: the only choice is 'auto' (with --target-accuracy A)")
    if reject == "auto" and (target_accuracy is None or not 0.0 < target_accuracy <= 1.0):
        raise UsageError("--reject auto needs --target-accuracy A, an accuracy from 0 to 1 such as 0.95")
    if target_accuracy is not None and reject is None:
        raise UsageError("--target-accuracy goes with --reject auto")


def auto_threshold(loaded: LoadedModel, target_accuracy: float) -> RejectRule:
    """The threshold whose answered validation images reach `target_accuracy` (calibrated, from best.pt's own outputs)."""
    if loaded.validation is None:
        raise CheckpointError(
            "this checkpoint keeps no validation predictions (an older finetune); use --min-confidence P instead"
        )
    logits, targets = loaded.validation
    probs = Predictions.from_logits([""] * len(targets), logits, targets, temperature=loaded.temperature).probs
    rule = threshold_for_accuracy(probs, targets, target_accuracy)
    if rule is None:
        best = risk_coverage(probs, targets).iloc[0]
        raise UsageError(
            f"no confidence threshold reaches {target_accuracy:.1%} accuracy on the validation split (its most confident "
            f"answers reach {best['accuracy']:.1%}); lower --target-accuracy, or use --min-confidence P"
        )
    return rule


def predict(
    *,
    run: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path | None = None,
    progress: bool = True,
    min_confidence: float | None = None,
    reject: str | None = None,
    target_accuracy: float | None = None,
) -> pd.DataFrame:
    """Classify image files and folders (searched recursively); returns and optionally writes a CSV.

    `run` is a run folder, a checkpoint, or a file written by `finetune export` (.onnx, TorchScript .pt): the same
    CSV either way. Probabilities are calibrated with the run's temperature. `min_confidence` (or `reject="auto"`
    with a `target_accuracy`, threshold chosen on the validation split) answers 'unknown' below the threshold.
    """
    check_inputs_exist(inputs)
    _check_reject_options(min_confidence, reject, target_accuracy)
    if out is not None:
        check_writable_file(Path(out))  # before any image is read
    if is_exported(Path(run)):
        if reject is not None:
            raise UsageError(
                "--reject auto needs the run's validation predictions; with an exported model use --min-confidence P"
            )
        table = _predict_exported(load_exported(Path(run)), inputs, progress=progress, min_confidence=min_confidence)
    else:
        table = _predict_run(
            Path(run), inputs, progress=progress, min_confidence=min_confidence, reject=reject, target_accuracy=target_accuracy
        )
    if out is not None:
        write_table(table, Path(out), float_format="%.6f")
        log.info("wrote %d predictions to %s", len(table), out)
    return table


def _readable(inputs: Sequence[str | Path], extensions: Sequence[str], policy: str, progress: bool) -> list[str]:
    frame = pd.DataFrame({"path": input_paths(inputs, extensions), "label": "", "split": ""})
    screened = screen_samples(frame, policy=policy, progress=progress)
    if screened.samples.empty:
        raise DataError(
            f"none of the {len(screened.skipped)} input image(s) could be decoded, e.g. {screened.skipped['path'].iloc[0]}"
        )
    return list(screened.samples["path"])


def _predict_run(
    run: Path,
    inputs: Sequence[str | Path],
    *,
    progress: bool,
    min_confidence: float | None,
    reject: str | None,
    target_accuracy: float | None,
) -> pd.DataFrame:
    checkpoint = checkpoint_path(run)
    loaded = model_from_checkpoint(load_checkpoint(checkpoint))
    if reject == "auto" and target_accuracy is not None:
        rule = auto_threshold(loaded, target_accuracy)
        min_confidence = rule.threshold
        _remember(RunDir.of_checkpoint(checkpoint), rule)
    paths = _readable(inputs, loaded.recipe.data.extensions, loaded.recipe.data.bad_images, progress)
    preds = predict_paths(loaded, paths, [-1] * len(paths), progress=progress, desc="predict")
    return predictions_table(preds, loaded.class_names, top_k=loaded.recipe.eval.top_k, min_confidence=min_confidence)


def _predict_exported(
    model: Exported, inputs: Sequence[str | Path], *, progress: bool, min_confidence: float | None
) -> pd.DataFrame:
    """The same CSV from an exported file: finetune's decode and resize, then the file's own graph."""
    paths = _readable(inputs, IMAGE_EXTENSIONS, "skip", progress)
    probs = np.concatenate([model.run(batch)[1] for batch in image_batches(paths, model.image)])
    preds = Predictions(paths=paths, probs=probs, targets=np.full(len(paths), -1))
    return predictions_table(preds, model.class_names, top_k=int(model.meta.get("top_k", 5)), min_confidence=min_confidence)


def _remember(run: RunDir | None, rule: RejectRule) -> None:
    """Keep the chosen threshold with the run (RUN/reject.json), so later calls and people can see it."""
    log.info(
        "reject below confidence %.4f: on the validation split %.1f%% of images answered at %.1f%% accuracy",
        rule.threshold,
        100 * (rule.coverage or 0),
        100 * (rule.accuracy or 0),
    )
    if run is not None:
        write_text(run.reject, json.dumps(rule.to_dict(), indent=1))
