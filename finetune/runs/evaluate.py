"""`finetune eval`: a trained run (or checkpoint) applied to labelled images, with the full report."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from finetune.data.doctor import EVALUATION_ADVICE, screen_samples
from finetune.data.facts import FactsCache
from finetune.data.label_tools import is_tool_export
from finetune.data.members import is_shard_folder
from finetune.data.scan import read_manifest, read_tool_manifest, scan_image_folder
from finetune.data.shards import read_shard_set, shard_index
from finetune.data.split import evaluation_split
from finetune.errors import DataError
from finetune.files import check_replaceable, path_key, read_text_table
from finetune.inference.checkpoint import checkpoint_path
from finetune.inference.predictor import Predictor
from finetune.reporting.report import MARKER as REPORT_MARKER
from finetune.reporting.report import Report
from finetune.reporting.run_report import write_run_report
from finetune.run_dir import RunDir, check_destination

log = logging.getLogger(__name__)


def evaluate(*, run: str | Path, data: str | Path, out: str | Path | None = None, progress: bool = True) -> Report:
    """Evaluate a run's best checkpoint on labelled images; writes the report into `out` (default RUN/report)."""
    checkpoint = checkpoint_path(Path(run))
    predictor = Predictor(run)
    trained = predictor.trained
    samples = _labelled_images(
        Path(data), trained.recipe.data.extensions, multilabel=trained.task.name == "multilabel", progress=progress
    )
    if (samples["split"] != "").any():
        split = evaluation_split(samples)
        samples = samples[samples["split"] == split]
        if samples.empty:
            raise DataError(f"{data} has no test/ or val/ images to evaluate")
    else:
        split = Path(data).name
    owner = RunDir.of_checkpoint(checkpoint)
    folder = Path(out) if out is not None else (owner.report if owner is not None else checkpoint.parent / "report")
    check_destination(folder, reads=[owner.root] if owner is not None else [])
    check_replaceable(folder, marker=REPORT_MARKER)  # before any work: a folder of other files is refused
    rows, skipped = samples.reset_index(drop=True), pd.DataFrame(columns=[*samples.columns, "reason"])
    if not is_shard_folder(data):  # a shard folder was screened as it was written
        screened = screen_samples(
            rows,
            policy=trained.recipe.data.bad_images,
            progress=progress,
            cache=FactsCache.default(),
            advice=EVALUATION_ADVICE,
            multilabel=trained.task.name == "multilabel",
        )
        rows, skipped = screened.samples, screened.skipped
    preds = predictor.predictions(list(rows["path"]), trained.targets_of(rows["label"]), progress=progress, desc="evaluate")
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
    return write_run_report(trained, preds, folder, split=split, selection=selection, skipped=skipped, run=owner)


def _labelled_images(data: Path, extensions: list[str], *, multilabel: bool, progress: bool) -> pd.DataFrame:
    """(path, label, split) of a folder of class folders or a CSV manifest; a multi-label model needs a manifest
    with a `labels` column, a single-label one a `label` column, folders, a labelling tool's export or a shard
    folder (its images as written)."""
    if is_shard_folder(data):
        if multilabel:
            raise DataError(f"this model gives several labels per image; shard folder {data} holds one label per image")
        return shard_index(read_shard_set(data, progress=progress)).samples
    if is_tool_export(data):
        if multilabel:
            raise DataError(f"this model gives several labels per image: evaluate it on a CSV manifest 'path,labels', not {data}")
        return read_tool_manifest(data)
    if data.suffix.lower() != ".csv":
        if multilabel:
            raise DataError(
                f"this model gives several labels per image: evaluate it on a CSV manifest 'path,labels', not the folder {data}"
            )
        return scan_image_folder(data, extensions=extensions)
    if not data.is_file():
        raise DataError(f"manifest {data} does not exist; check --data")
    has_labels = "labels" in read_text_table(data, nrows=0).columns
    if has_labels != multilabel:
        wanted = "'labels' (names joined by |)" if multilabel else "'label'"
        raise DataError(f"manifest {data} does not match this model: it needs a {wanted} column")
    return read_manifest(data)


def _seen_by_run(run: RunDir | None, paths: list[str]) -> tuple[int, int]:
    """How many of `paths` (compared as real paths) are in the run's val split and in its train split."""
    if run is None or not run.splits.exists():
        return 0, 0
    splits = read_text_table(run.splits)
    real = {path_key(p) for p in paths}
    seen = {name: {path_key(p) for p in splits.loc[splits["split"] == name, "path"]} for name in ("val", "train")}
    return len(real & seen["val"]), len(real & seen["train"])
