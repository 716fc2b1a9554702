"""`finetune predict`: calibrated predictions for new images, with the reject option ('unknown' below a threshold)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from finetune.deploy.predictor import ExportedPredictor
from finetune.deploy.runtime import is_exported
from finetune.files import check_writable_file, guarded, write_table
from finetune.inference.inputs import ImageInput, check_inputs_exist
from finetune.inference.predictor import Predictor, check_reject_options
from finetune.run_dir import check_destination_file

log = logging.getLogger(__name__)


def load(run: str | Path) -> Predictor | ExportedPredictor:
    """A run folder, checkpoint or exported file loaded once; `.predict(images)` takes paths, folders, PIL images
    and uint8 arrays and returns a DataFrame."""
    return ExportedPredictor(run) if is_exported(Path(run)) else Predictor(run)


def predict(
    *,
    run: str | Path,
    inputs: Sequence[ImageInput],
    out: str | Path | None = None,
    progress: bool = True,
    min_confidence: float | None = None,
    reject: str | None = None,
    target_accuracy: float | None = None,
) -> pd.DataFrame:
    """Classify image files and folders (searched recursively), PIL images and uint8 arrays; returns and optionally
    writes a CSV.

    `run` is a run folder, a checkpoint, or a file written by `finetune export` (.onnx, TorchScript .pt): the same
    CSV either way. Probabilities are calibrated with the run's temperature (and averaged over `eval.tta` views).
    `min_confidence` (or `reject="auto"` with a `target_accuracy`, threshold chosen on the validation split) answers
    'unknown' below the threshold.
    """
    check_inputs_exist(inputs)
    check_reject_options(min_confidence, reject, target_accuracy)
    if out is not None:
        check_writable_file(Path(out))  # before any image is read
        check_destination_file(out)
    table = load(run).predict(
        inputs, progress=progress, min_confidence=min_confidence, reject=reject, target_accuracy=target_accuracy
    )
    if out is not None:
        with guarded(Path(out), atomic=True):
            write_table(table, Path(out), float_format="%.6f")
        log.debug("wrote %d predictions to %s", len(table), out)  # the command prints it
    return table
