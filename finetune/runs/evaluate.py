"""`finetune eval` and `finetune predict`: a trained run (or checkpoint) applied to labelled or new images."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.data.doctor import screen_samples
from finetune.data.facts import FactsCache
from finetune.data.loader import PictureDataset, make_loader
from finetune.data.scan import scan_image_folder
from finetune.data.split import DatasetIndex, evaluation_split
from finetune.data.transforms import build_eval_pipeline
from finetune.errors import DataError, RunDirError
from finetune.evaluation.explain import Explainer
from finetune.evaluation.inference import Predictions, run_inference
from finetune.evaluation.tta import describe, run_tta
from finetune.files import check_writable_folder, read_text_table, write_table
from finetune.reporting.html import Explain, RunContext
from finetune.reporting.report import Report, write_report
from finetune.run_dir import RunDir
from finetune.training.checkpoint import LoadedModel, load_checkpoint, model_from_checkpoint
from finetune.training.device import resolve_device

log = logging.getLogger(__name__)


def checkpoint_path(run: Path) -> Path:
    """A run folder's best.pt, or the checkpoint file itself."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise RunDirError(f"run {run} does not exist; pass a run folder written by 'finetune train' or a .pt checkpoint")
    return RunDir(run).best


def predict_paths(
    loaded: LoadedModel,
    paths: Sequence[str | np.ndarray],
    targets: list[int],
    *,
    progress: bool,
    desc: str,
    names: Sequence[str] | None = None,
    unreadable: str = "fail",
) -> Predictions:
    """Calibrated probabilities of `loaded` for image files (or RGB arrays, then called `names`), through the run's
    own eval pipeline and its test-time views (`eval.tta`, probabilities averaged)."""
    dataset = PictureDataset(paths, targets, build_eval_pipeline(loaded.image), unreadable=unreadable)
    data = loaded.recipe.data
    loader = make_loader(dataset, batch_size=data.batch_size, num_workers=data.num_workers, shuffle=False, seed=0)
    device = resolve_device(loaded.recipe.train.device)
    model = loaded.bundle.model.to(device)
    labels = list(names) if names is not None else [str(p) for p in paths]
    if loaded.recipe.eval.tta:
        return run_tta(
            model,
            loader,
            names=loaded.recipe.eval.tta,
            device=device,
            paths=labels,
            temperature=loaded.temperature,
            progress=progress,
            desc=desc,
        )
    return run_inference(model, loader, device=device, paths=labels, progress=progress, desc=desc, temperature=loaded.temperature)


def explainer_for(loaded: LoadedModel) -> tuple[Explain | None, str | None]:
    """Grad-CAM overlays for the report's galleries and where they come from (None when the recipe turns them off)."""
    if not loaded.recipe.eval.gradcam:
        return None, None
    explainer = Explainer(loaded.bundle, loaded.image)

    def overlays(paths: Sequence[str], classes: Sequence[int]) -> list[np.ndarray]:
        return [e.overlay for e in explainer.explain(paths, classes)]

    return overlays, explainer.where


def _report_notes(loaded: LoadedModel, run: RunDir | None, skipped_here: int) -> dict[str, str]:
    skipped_train = len(read_text_table(run.skipped)) if run is not None and run.skipped.exists() else 0
    notes = {"unreadable images skipped": f"{skipped_here} in this evaluation, {skipped_train} in the run's data (skipped.csv)"}
    if loaded.recipe.eval.tta:
        notes["test-time augmentation"] = describe(loaded.recipe.eval.tta) + " (validation during training: one view)"
    if run is not None and run.class_weights.exists():
        weights = json.loads(run.class_weights.read_text(encoding="utf-8"))
        notes["loss class weights"] = ", ".join(f"{name}: {value:.3g}" for name, value in weights.items())
    return notes


def _targets(loaded: LoadedModel, rows: pd.DataFrame) -> list[int]:
    lookup = {name: i for i, name in enumerate(loaded.class_names)}
    unknown = sorted(set(rows["label"]) - set(lookup))
    if unknown:
        raise DataError(
            f"class folder(s) {unknown} are not classes of this model {loaded.class_names}; evaluate only on known classes"
        )
    return [lookup[label] for label in rows["label"]]


def write_run_report(
    loaded: LoadedModel,
    preds: Predictions,
    folder: Path,
    *,
    split: str,
    selection: bool | str,
    skipped: pd.DataFrame,
    run: RunDir | None,
) -> Report:
    """The report of `preds` into `folder`, with the run's context (training curves, splits, Grad-CAM galleries)."""
    title = f"{loaded.recipe.model.name} on the {split} split ({len(preds.paths)} images)"
    explain, where = explainer_for(loaded)
    notes = _report_notes(loaded, run, len(skipped)) | ({"Grad-CAM layer": where} if where else {})
    context = RunContext(
        meta=loaded.meta, run=run, split=split, selection=selection, extra=notes, tta=tuple(loaded.recipe.eval.tta)
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_table(skipped, folder / "skipped.csv")
    return write_report(
        preds, loaded.class_names, folder, top_k=loaded.recipe.eval.top_k, title=title, context=context, explain=explain
    )


def report_for_run(run: RunDir, index: DatasetIndex, *, progress: bool) -> Report:
    """The report of a finished run: its best checkpoint on the test split; without one, on the validation split it
    already predicted at its best epoch (not inferred twice, and said to be optimistic)."""
    split = index.evaluation_split
    rows = index.split(split)
    loaded = model_from_checkpoint(load_checkpoint(run.best))
    single_view = not loaded.recipe.eval.tta  # best.pt's validation logits are single-view
    if split == "val" and single_view and loaded.validation is not None and len(loaded.validation[1]) == len(rows):
        logits, targets = loaded.validation
        preds = Predictions.from_logits(list(rows["path"]), logits, targets, temperature=loaded.temperature)
    else:
        preds = predict_paths(loaded, list(rows["path"]), _targets(loaded, rows), progress=progress, desc="evaluate")
    skipped = pd.DataFrame(columns=[*rows.columns, "reason"])  # the run's images were screened before training
    return write_run_report(loaded, preds, run.report, split=split, selection=split == "val", skipped=skipped, run=run)


def evaluate(*, run: str | Path, data: str | Path, out: str | Path | None = None, progress: bool = True) -> Report:
    """Evaluate a run's best checkpoint on labelled images; writes the report into `out` (default RUN/report)."""
    checkpoint = checkpoint_path(Path(run))
    loaded = model_from_checkpoint(load_checkpoint(checkpoint))
    samples = scan_image_folder(Path(data), extensions=loaded.recipe.data.extensions)
    if (samples["split"] != "").any():
        split = evaluation_split(samples)
        samples = samples[samples["split"] == split]
        if samples.empty:
            raise DataError(f"{data} has no test/ or val/ images to evaluate")
    else:
        split = Path(data).name
    owner = RunDir.of_checkpoint(checkpoint)
    folder = Path(out) if out is not None else (owner.report if owner is not None else checkpoint.parent / "report")
    check_writable_folder(folder, what="--out")
    screened = screen_samples(
        samples.reset_index(drop=True), policy=loaded.recipe.data.bad_images, progress=progress, cache=FactsCache.default()
    )
    rows = screened.samples
    preds = predict_paths(loaded, list(rows["path"]), _targets(loaded, rows), progress=progress, desc="evaluate")
    in_val, in_train = _seen_by_run(owner, list(rows["path"]))
    if in_train:
        log.warning(
            "%d of these %d images are in the run's training split: the figures overstate what the model does on new images",
            in_train,
            len(rows),
        )
    selection: bool | str = False
    if in_val + in_train:
        selection = f"{in_val} of these images chose the run's best epoch (its val split) and {in_train} trained it"
    return write_run_report(loaded, preds, folder, split=split, selection=selection, skipped=screened.skipped, run=owner)


def _seen_by_run(run: RunDir | None, paths: list[str]) -> tuple[int, int]:
    """How many of `paths` (compared as real paths) are in the run's val split and in its train split."""
    if run is None or not run.splits.exists():
        return 0, 0
    splits = read_text_table(run.splits)
    real = {os.path.realpath(p) for p in paths}
    seen = {name: {os.path.realpath(p) for p in splits.loc[splits["split"] == name, "path"]} for name in ("val", "train")}
    return len(real & seen["val"]), len(real & seen["train"])
