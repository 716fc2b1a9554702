"""The report of a trained run on labelled images, with the run's context (training curves, splits, Grad-CAM)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.data.split import DatasetIndex
from finetune.evaluation.explain import Explainer
from finetune.files import read_text_table
from finetune.inference.checkpoint import TrainedModel
from finetune.inference.forward import describe
from finetune.inference.predictions import Predictions
from finetune.inference.predictor import Predictor
from finetune.reporting.html import Explain, RunContext
from finetune.reporting.multilabel_report import write_multilabel_report
from finetune.reporting.report import Report, write_report
from finetune.run_dir import RunDir


def explainer_for(trained: TrainedModel) -> tuple[Explain | None, str | None]:
    """Grad-CAM overlays for the report's galleries and where they come from (None when the recipe turns them off)."""
    if not trained.recipe.eval.gradcam:
        return None, None
    explainer = Explainer(trained.bundle, trained.image)

    def overlays(paths: Sequence[str], classes: Sequence[int]) -> list[np.ndarray]:
        return [e.overlay for e in explainer.explain(paths, classes)]

    return overlays, explainer.where


def _report_notes(trained: TrainedModel, run: RunDir | None, skipped_here: int) -> dict[str, str]:
    skipped_train = len(read_text_table(run.skipped)) if run is not None and run.skipped.exists() else 0
    notes = {"unreadable images skipped": f"{skipped_here} in this evaluation, {skipped_train} in the run's data (skipped.csv)"}
    if trained.recipe.eval.tta:
        notes["test-time augmentation"] = describe(trained.recipe.eval.tta) + " (validation during training: one view)"
    if run is not None and run.class_weights.exists():
        weights = json.loads(run.class_weights.read_text(encoding="utf-8"))
        notes["loss class weights"] = ", ".join(f"{name}: {value:.3g}" for name, value in weights.items())
    return notes


def write_run_report(
    trained: TrainedModel,
    preds: Predictions,
    folder: Path,
    *,
    split: str,
    selection: bool | str,
    skipped: pd.DataFrame,
    run: RunDir | None,
    leaks: pd.DataFrame | None = None,
) -> Report:
    """The report of `preds` into `folder`, with the run's context (training curves, splits, Grad-CAM galleries);
    `leaks`, the run's duplicate pairs across its own splits, go in the banner of a report on those splits."""
    title = f"{trained.recipe.model.name} on the {split} split ({len(preds.paths)} images)"
    explain, where = explainer_for(trained)
    notes = _report_notes(trained, run, len(skipped)) | ({"Grad-CAM layer": where} if where else {})
    context = RunContext(
        meta=trained.meta,
        run=run,
        split=split,
        selection=selection,
        extra=notes,
        tta=tuple(trained.recipe.eval.tta),
        leaks=leaks,
    )
    if trained.task.name == "multilabel":
        return write_multilabel_report(preds, trained.class_names, folder, title=title, context=context, skipped=skipped)
    return write_report(
        preds,
        trained.class_names,
        folder,
        top_k=trained.recipe.eval.top_k,
        title=title,
        context=context,
        explain=explain,
        skipped=skipped,
    )


def report_for_run(run: RunDir, index: DatasetIndex, *, progress: bool) -> Report:
    """The report of a finished run: its best checkpoint on the test split; without one, on the validation split it
    already predicted at its best epoch (not inferred twice, and said to be optimistic)."""
    split = index.evaluation_split
    rows = index.split(split)
    predictor = Predictor(run.best)
    trained = predictor.trained
    single_view = not trained.recipe.eval.tta  # best.pt's validation logits are single-view
    if split == "val" and single_view and trained.validation is not None and len(trained.validation[1]) == len(rows):
        logits, targets = trained.validation
        preds = Predictions.from_logits(list(rows["path"]), logits, targets, temperature=trained.temperature, task=trained.task)
    else:
        preds = predictor.predictions(list(rows["path"]), trained.targets_of(rows["label"]), progress=progress, desc="evaluate")
    skipped = pd.DataFrame(columns=[*rows.columns, "reason"])  # the run's images were screened before training
    leaks = read_text_table(run.leakage) if run.leakage.exists() else None
    return write_run_report(
        trained, preds, run.report, split=split, selection=split == "val", skipped=skipped, run=run, leaks=leaks
    )
