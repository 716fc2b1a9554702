"""The model a server answers with: a run folder (through `Predictor`) or an exported file (through
`ExportedPredictor`), applied to decoded images exactly as `finetune predict` applies them, plus what /metadata says.

Nothing here loads torch at import; opening a run does, and so (through finetune's resize and test-time views) does
opening an exported file, whose graph itself runs in onnxruntime.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.errors import UsageError

if TYPE_CHECKING:
    from finetune.deploy.predictor import ExportedPredictor
    from finetune.inference.predictions import Predictions
    from finetune.inference.predictor import Predictor

log = logging.getLogger(__name__)
REPORTED = ("accuracy", "balanced_accuracy", "macro_f1", "ece", "nll", "brier", "num_images", "ci95", "evaluated_on")


@dataclass
class ServedModel:
    """A loaded predictor, its reject threshold and the facts /metadata reports."""

    predictor: Predictor | ExportedPredictor
    top_k: int
    min_confidence: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    def classify(self, images: list[np.ndarray], names: list[str]) -> list[dict[str, Any]]:
        """One answer per decoded RGB image: label ('unknown' below the reject threshold), confidence, every class's
        probability and the top k; the same numbers `finetune predict` writes for the same files."""
        from finetune.inference.predictions import predictions_table

        preds = self._predictions(images, names)
        table = predictions_table(preds, self.class_names, top_k=self.top_k, min_confidence=self.min_confidence)
        k = min(self.top_k, len(self.class_names))
        answers = []
        several = "labels" in table.columns  # several labels per image: the set, names joined by |
        for row, name, probs in zip(table.itertuples(index=False), names, preds.probs):
            label = str(row.labels if several else row.predicted_label)
            unknown = bool(self.min_confidence is not None and float(row.confidence) < self.min_confidence)
            answer = {
                "file": name,
                "label": label,
                "confidence": float(row.confidence),
                "unknown": unknown,
                "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)},
                "top_k": [{"label": self.class_names[i], "probability": float(probs[i])} for i in np.argsort(-probs)[:k]],
            }
            if several:
                answer["labels"] = [] if unknown else [n for n in label.split("|") if n]
            answers.append(answer)
        return answers

    def _predictions(self, images: list[np.ndarray], names: list[str]) -> Predictions:
        from finetune.inference.predictions import Predictions
        from finetune.inference.predictor import Predictor

        if isinstance(self.predictor, Predictor):  # the run's eval pipeline and test-time views, in this thread
            return self.predictor.predictions(list(images), names=names, workers=0)
        probs = self.predictor.probabilities(list(images))
        return Predictions(paths=list(names), probs=probs, targets=np.full(len(names), -1))


def open_model(
    source: Path, *, min_confidence: float | None = None, reject: str | None = None, target_accuracy: float | None = None
) -> ServedModel:
    """A run folder, checkpoint or exported file, with `finetune predict`'s reject options resolved once."""
    from finetune.deploy.runtime import is_exported
    from finetune.inference.predictor import check_reject_options

    check_reject_options(min_confidence, reject, target_accuracy)
    if is_exported(source):
        return _open_exported(source, min_confidence=min_confidence, reject=reject)
    return _open_run(source, min_confidence=min_confidence, target_accuracy=target_accuracy if reject else None)


def _open_run(source: Path, *, min_confidence: float | None, target_accuracy: float | None) -> ServedModel:
    from finetune.deploy.metadata import resize_rule
    from finetune.inference.predictor import Predictor, auto_threshold

    predictor = Predictor(source)
    trained = predictor.trained
    if target_accuracy is not None:
        min_confidence = auto_threshold(trained, target_accuracy).threshold
        log.info("reject below confidence %.4f (validation split, target accuracy %.3f)", min_confidence, target_accuracy)
    image = trained.image
    facts = {
        "source": "run",
        "model_name": trained.recipe.model.name,
        "task": trained.task.name,
        "temperature": float(trained.temperature),
        "input": {
            "size": image.input_size,
            "mean": list(image.mean),
            "std": list(image.std),
            "resize": resize_rule(image),
            "tta": list(trained.recipe.eval.tta),
        },
        "test_metrics": _test_metrics(predictor.run_dir.report / "metrics.json" if predictor.run_dir else None),
    }
    return ServedModel(predictor=predictor, top_k=trained.recipe.eval.top_k, min_confidence=min_confidence, facts=facts)


def _open_exported(source: Path, *, min_confidence: float | None, reject: str | None) -> ServedModel:
    from finetune.deploy.predictor import ExportedPredictor

    if reject is not None:
        raise UsageError("--reject auto needs the run's validation predictions; with an exported model use --min-confidence P")
    predictor = ExportedPredictor(source)
    meta = predictor.exported.meta
    facts = {
        "source": "exported",
        "model_name": meta.get("model_name"),
        "task": meta.get("task", "single_label"),
        "temperature": float(meta.get("temperature", 1.0)),
        "input": {
            "size": int(meta["resize"]["crop"]),
            "mean": meta.get("mean"),
            "std": meta.get("std"),
            "resize": meta["resize"],
            "tta": list(meta.get("tta") or []),
        },
        # `finetune export RUN` writes into RUN/export/: the run's report is then two folders up
        "test_metrics": _test_metrics(source.resolve().parent.parent / "report" / "metrics.json"),
    }
    return ServedModel(predictor=predictor, top_k=int(meta.get("top_k", 5)), min_confidence=min_confidence, facts=facts)


def _test_metrics(path: Path | None) -> dict[str, Any] | None:
    """The headline figures of the run's report/metrics.json, with their 95% intervals; None without a report."""
    if path is None or not path.is_file():
        return None
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; /metadata reports no test metrics", path)
        return None
    return {key: figures[key] for key in REPORTED if key in figures} if isinstance(figures, dict) else None
