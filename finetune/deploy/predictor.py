"""An exported file as a predictor with the same `predict` as a run's: finetune's decode and resize, then the file's
own graph (once per test-time view listed in its metadata, probabilities averaged). No torch model is rebuilt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.config.catalog import IMAGE_EXTENSIONS
from finetune.deploy.package import image_batches
from finetune.deploy.runtime import Exported, load_exported
from finetune.errors import UsageError
from finetune.inference.forward import tta_views, view_pixels
from finetune.inference.inputs import ImageInput, Pictures, as_list, check_inputs_exist
from finetune.inference.predictions import Predictions, predictions_table
from finetune.inference.predictor import check_reject_options
from finetune.inference.task import DEFAULT_TASK, task_named


class ExportedPredictor:
    """`finetune.load("model.onnx")`: predictions from an exported file, equal to the run's own to 1e-4."""

    def __init__(self, path: str | Path) -> None:
        self.exported: Exported = load_exported(Path(path))

    @property
    def class_names(self) -> list[str]:
        return self.exported.class_names

    def probabilities(self, sources: Sequence[str | np.ndarray]) -> np.ndarray:
        """Calibrated probabilities (N x C) of decoded files or RGB arrays, averaged over the stored test-time views."""
        model = self.exported
        views = tta_views(model.meta.get("tta") or [])
        batches = [
            np.mean([model.run(view_pixels(batch, view))[1] for view in views], axis=0)
            for batch in image_batches(sources, model.image)
        ]
        return np.concatenate(batches) if batches else np.zeros((0, len(self.class_names)), dtype=np.float32)

    def predict(
        self,
        inputs: Sequence[ImageInput] | ImageInput,
        *,
        progress: bool = False,
        min_confidence: float | None = None,
        reject: str | None = None,
        target_accuracy: float | None = None,
    ) -> pd.DataFrame:
        """The table `finetune predict` writes, from the exported file."""
        items = as_list(inputs)
        check_inputs_exist(items)
        check_reject_options(min_confidence, reject, target_accuracy)
        if reject is not None:
            raise UsageError(
                "--reject auto needs the run's validation predictions; with an exported model use --min-confidence P"
            )
        pictures = Pictures.gather(items, IMAGE_EXTENSIONS, policy="skip", progress=progress)
        probs = self.probabilities(pictures.sources)
        task = task_named(str(self.exported.meta.get("task", DEFAULT_TASK)), thresholds=self.exported.meta.get("thresholds"))
        preds = Predictions(paths=pictures.names, probs=probs, targets=np.full(len(pictures.names), -1), task=task)
        top_k = int(self.exported.meta.get("top_k", 5))
        return predictions_table(preds, self.class_names, top_k=top_k, min_confidence=min_confidence)

    def __repr__(self) -> str:
        return f"ExportedPredictor({self.exported.path}, classes={self.class_names})"
