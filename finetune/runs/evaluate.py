"""`finetune eval` and `finetune predict`: a trained run (or checkpoint) applied to labelled or new images."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from finetune.data.doctor import Screened, screen_samples
from finetune.data.loader import ImageDataset, make_loader
from finetune.data.scan import list_images, scan_image_folder
from finetune.data.split import DatasetIndex, evaluation_split
from finetune.data.transforms import build_eval_pipeline
from finetune.errors import DataError, RunDirError
from finetune.evaluation.inference import Predictions, run_inference
from finetune.evaluation.metrics import predictions_table
from finetune.files import check_writable_file, check_writable_folder, read_text_table, write_table
from finetune.reporting.html import RunContext
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


def predict_paths(loaded: LoadedModel, paths: list[str], targets: list[int], *, progress: bool, desc: str) -> Predictions:
    """Probabilities of `loaded` for image files, through the run's own eval pipeline."""
    dataset = ImageDataset(paths, targets, build_eval_pipeline(loaded.image))
    loader = make_loader(
        dataset, batch_size=loaded.recipe.data.batch_size, num_workers=loaded.recipe.data.num_workers, shuffle=False, seed=0
    )
    device = resolve_device(loaded.recipe.train.device)
    return run_inference(loaded.bundle.model.to(device), loader, device=device, paths=paths, progress=progress, desc=desc)


def _report_notes(run: RunDir | None, skipped_here: int) -> dict[str, str]:
    skipped_train = len(read_text_table(run.skipped)) if run is not None and run.skipped.exists() else 0
    notes = {"unreadable images skipped": f"{skipped_here} in this evaluation, {skipped_train} in the run's data (skipped.csv)"}
    if run is not None and run.class_weights.exists():
        weights = json.loads(run.class_weights.read_text(encoding="utf-8"))
        notes["loss class weights"] = ", ".join(f"{name}: {value:.3g}" for name, value in weights.items())
    return notes


def report_for(
    loaded: LoadedModel, screened: Screened, folder: Path, *, split: str, progress: bool, run: RunDir | None
) -> Report:
    """Predict the screened, labelled rows and write the report into `folder`."""
    rows = screened.samples
    lookup = {name: i for i, name in enumerate(loaded.class_names)}
    unknown = sorted(set(rows["label"]) - set(lookup))
    if unknown:
        raise DataError(
            f"class folder(s) {unknown} are not classes of this model {loaded.class_names}; evaluate only on known classes"
        )
    preds = predict_paths(
        loaded, list(rows["path"]), [lookup[label] for label in rows["label"]], progress=progress, desc="evaluate"
    )
    title = f"{loaded.recipe.model.name} on {split} ({len(rows)} images)"
    context = RunContext(meta=loaded.meta, run=run, split=split, extra=_report_notes(run, len(screened.skipped)))
    folder.mkdir(parents=True, exist_ok=True)
    write_table(screened.skipped, folder / "skipped.csv")
    return write_report(preds, loaded.class_names, folder, top_k=loaded.recipe.eval.top_k, title=title, context=context)


def report_for_run(run: RunDir, index: DatasetIndex, *, progress: bool) -> Report:
    """The report of a finished run: its best checkpoint on its test split (else val); those images were screened already."""
    split = index.evaluation_split
    rows = index.split(split)
    screened = Screened(samples=rows, skipped=pd.DataFrame(columns=[*rows.columns, "reason"]), facts={})
    loaded = model_from_checkpoint(load_checkpoint(run.best))
    return report_for(loaded, screened, run.report, split=split, progress=progress, run=run)


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
    screened = screen_samples(samples.reset_index(drop=True), policy=loaded.recipe.data.bad_images, progress=progress)
    return report_for(loaded, screened, folder, split=split, progress=progress, run=owner)


def _check_inputs_exist(inputs: Sequence[str | Path]) -> None:
    missing = next((item for item in map(Path, inputs) if not item.exists()), None)
    if missing is not None:
        raise DataError(f"input {missing} does not exist; pass image files or folders")


def _input_paths(inputs: Sequence[str | Path], extensions: Sequence[str]) -> list[str]:
    """Files as given, and images in folders (recursive, with the run's extensions)."""
    paths: list[str] = []
    for item in map(Path, inputs):
        paths += [str(p) for p in list_images(item, extensions)] if item.is_dir() else [str(item)]
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(extensions)})")
    return paths


def predict(
    *, run: str | Path, inputs: Sequence[str | Path], out: str | Path | None = None, progress: bool = True
) -> pd.DataFrame:
    """Classify image files and folders (searched recursively); returns and optionally writes a CSV."""
    _check_inputs_exist(inputs)
    if out is not None:
        check_writable_file(Path(out))  # before any image is read
    loaded = model_from_checkpoint(load_checkpoint(checkpoint_path(Path(run))))
    paths = _input_paths(inputs, loaded.recipe.data.extensions)
    frame = pd.DataFrame({"path": paths, "label": "", "split": ""})
    screened = screen_samples(frame, policy=loaded.recipe.data.bad_images, progress=progress)
    paths = list(screened.samples["path"])
    if not paths:
        raise DataError(
            f"none of the {len(screened.skipped)} input image(s) could be decoded, e.g. {screened.skipped['path'].iloc[0]}"
        )
    preds = predict_paths(loaded, paths, [-1] * len(paths), progress=progress, desc="predict")
    table = predictions_table(preds, loaded.class_names, top_k=loaded.recipe.eval.top_k)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_table(table, Path(out), float_format="%.6f")
        log.info("wrote %d predictions to %s", len(table), out)
    return table
