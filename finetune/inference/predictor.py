"""`Predictor`: a trained run loaded once, applied to images the way every command applies it.

eval, predict, explain, export's parity, the Python API (`finetune.load`) and a server all go through it: the
run's own eval pipeline, its test-time views, its temperature and, on request, its reject rule.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.data.loader import PictureDataset, make_loader
from finetune.data.transforms import build_eval_pipeline
from finetune.errors import CheckpointError, UsageError
from finetune.files import write_text
from finetune.inference.checkpoint import TrainedModel, checkpoint_path, load_trained
from finetune.inference.device import resolve_device
from finetune.inference.forward import run_inference, run_tta
from finetune.inference.inputs import ImageInput, Pictures, as_list, check_inputs_exist, drop_unreadable
from finetune.inference.predictions import Predictions, predictions_table
from finetune.inference.reject import RejectRule, risk_coverage, threshold_for_accuracy
from finetune.run_dir import RunDir

log = logging.getLogger(__name__)
TRUSTED_COUNT = 10  # fewer answered validation images than this: their accuracy is too few to trust (as the report says)


def check_reject_options(min_confidence: float | None, reject: str | None, target_accuracy: float | None) -> None:
    """The reject options of predict, checked before any image is read."""
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


def calibrated_validation(trained: TrainedModel, *, instead: str) -> tuple[np.ndarray, np.ndarray]:
    """best.pt's own validation outputs as calibrated probabilities, with their targets; `instead`: what to do when
    an older checkpoint keeps none."""
    if trained.validation is None:
        raise CheckpointError(f"this checkpoint keeps no validation predictions (an older finetune); {instead}")
    logits, targets = trained.validation
    return trained.task.probs(logits, trained.temperature), targets


def auto_threshold(trained: TrainedModel, target_accuracy: float) -> RejectRule:
    """The threshold whose answered validation images reach `target_accuracy` (calibrated, from best.pt's own outputs)."""
    if trained.task.name == "multilabel":
        raise UsageError(
            "--reject auto is for one label per image; with several use --min-confidence P (an image is 'unknown' when "
            "one of its class decisions is less sure than P)"
        )
    probs, targets = calibrated_validation(trained, instead="use --min-confidence P instead")
    rule = threshold_for_accuracy(probs, targets, target_accuracy)
    if rule is None:
        best = risk_coverage(probs, targets).iloc[0]
        raise UsageError(
            f"no confidence threshold reaches {target_accuracy:.1%} accuracy on the validation split (its most confident "
            f"answers reach {best['accuracy']:.1%}); lower --target-accuracy, or use --min-confidence P"
        )
    return rule


class Predictor:
    """A trained run or checkpoint loaded once, for repeated predictions (commands, notebooks, services).

    >>> predictor = finetune.load("runs/ants")
    >>> predictor.predict([PIL.Image.open("a.jpg"), "more_images/"])   # a DataFrame, one row per image
    """

    def __init__(self, run: str | Path | TrainedModel) -> None:
        self.run_dir: RunDir | None = None  # where `predict --reject auto` keeps its threshold
        self.checkpoint: Path | None = None
        if isinstance(run, TrainedModel):
            self.trained = run
            return
        self.checkpoint = checkpoint_path(run)
        self.trained = load_trained(run)  # resolved again: a run without best.pt says so, not 'run does not exist'
        self.run_dir = RunDir.of_checkpoint(self.checkpoint)

    @property
    def class_names(self) -> list[str]:
        return self.trained.class_names

    def predictions(
        self,
        sources: Sequence[str | np.ndarray],
        targets: Sequence[int] | np.ndarray | None = None,
        *,
        progress: bool = False,
        desc: str = "predict",
        names: Sequence[str] | None = None,
        unreadable: str = "fail",
        workers: int | None = None,
    ) -> Predictions:
        """Calibrated probabilities for image files (or RGB arrays, then called `names`), through the run's own eval
        pipeline and its test-time views (`eval.tta`, probabilities averaged); `workers` loader processes (None: the
        recipe's `data.num_workers`; a server predicting a few decoded images at a time passes 0)."""
        trained = self.trained
        labels = list(targets) if targets is not None else [-1] * len(sources)
        dataset = PictureDataset(sources, labels, build_eval_pipeline(trained.image), unreadable=unreadable)
        data = trained.recipe.data
        num_workers = data.num_workers if workers is None else workers
        loader = make_loader(dataset, batch_size=data.batch_size, num_workers=num_workers, shuffle=False, seed=0)
        device = resolve_device(trained.recipe.train.device)
        model = trained.bundle.model.to(device)
        paths = list(names) if names is not None else [str(p) for p in sources]
        views, temperature, task = trained.recipe.eval.tta, trained.temperature, trained.task
        if views:
            return run_tta(
                model,
                loader,
                names=views,
                device=device,
                paths=paths,
                temperature=temperature,
                progress=progress,
                desc=desc,
                task=task,
            )
        return run_inference(
            model, loader, device=device, paths=paths, temperature=temperature, progress=progress, desc=desc, task=task
        )

    def predict(
        self,
        inputs: Sequence[ImageInput] | ImageInput,
        *,
        progress: bool = False,
        min_confidence: float | None = None,
        reject: str | None = None,
        target_accuracy: float | None = None,
    ) -> pd.DataFrame:
        """Classify files, folders (recursive), PIL images and uint8 arrays; one DataFrame row per image, in order."""
        items = as_list(inputs)
        check_inputs_exist(items)
        check_reject_options(min_confidence, reject, target_accuracy)
        if reject == "auto" and target_accuracy is not None:
            rule = auto_threshold(self.trained, target_accuracy)
            min_confidence = rule.threshold
            self._remember(rule)
        preds = self.gathered_predictions(items, progress=progress)
        return self.table(preds, min_confidence=min_confidence)

    def gathered_predictions(self, items: Sequence[ImageInput], *, progress: bool = False) -> Predictions:
        """The predictions behind `predict`'s table: folders expanded, unreadable files left out as the run says."""
        data = self.trained.recipe.data
        pictures = Pictures.gather(items, data.extensions, policy=data.bad_images, progress=progress, screen=False)
        preds = self.predictions(pictures.sources, progress=progress, names=pictures.names, unreadable="mark")
        return drop_unreadable(preds, policy=data.bad_images)

    def table(self, preds: Predictions, *, min_confidence: float | None = None) -> pd.DataFrame:
        """The table `finetune predict` writes of `preds` (the run's top-k columns)."""
        top_k = self.trained.recipe.eval.top_k
        return predictions_table(preds, self.class_names, top_k=top_k, min_confidence=min_confidence)

    def _remember(self, rule: RejectRule) -> None:
        """Keep the chosen threshold with the run (RUN/reject.json), so later calls and people can see it."""
        answered = round((rule.coverage or 0) * len(self.trained.validation[1])) if self.trained.validation else 0
        log.info(
            "reject below confidence %.4f: on the validation split %.1f%% of images (%d) answered at %.1f%% accuracy%s",
            rule.threshold,
            100 * (rule.coverage or 0),
            answered,
            100 * (rule.accuracy or 0),
            ", too few to trust" if answered < TRUSTED_COUNT else "",
        )
        if self.run_dir is not None:  # a record for people: a place that cannot take it loses no prediction
            try:
                write_text(self.run_dir.reject, json.dumps(rule.to_dict(), indent=1))
            except OSError as exc:
                log.warning(
                    "%s not written (%s); the threshold above is used all the same", self.run_dir.reject, exc.strerror or exc
                )

    def __repr__(self) -> str:
        """What a notebook shows for `finetune.load(RUN)`: model, task, classes and the run's reported accuracy."""
        recipe = self.trained.recipe
        classes = self.class_names if len(self.class_names) <= 12 else [*self.class_names[:10], "..."]
        return (
            f"Predictor({recipe.model.name}, {self.trained.task.name}, {len(self.class_names)} classes {classes}, "
            f"{self._reported_accuracy()})"
        )

    def _reported_accuracy(self) -> str:
        """'test accuracy 0.9412 on 34 images' from the run's report/metrics.json, or why there is none."""
        metrics = self.run_dir.report / "metrics.json" if self.run_dir is not None else None
        if metrics is None or not metrics.is_file():
            return "no report beside the checkpoint"
        try:
            figures = json.loads(metrics.read_text(encoding="utf-8"))
            split = figures.get("evaluated_on", {}).get("split", "eval")
            whose = "" if self.checkpoint is None or self.checkpoint.name == "best.pt" else ", the report of best.pt"
            if figures.get("task") == "multilabel":
                return f"{split} mean average precision {float(figures['mean_average_precision']):.4f} on {int(figures['num_images'])} images{whose}"
            return f"{split} accuracy {float(figures['accuracy']):.4f} on {int(figures['num_images'])} images{whose}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "report/metrics.json unreadable"
