"""The Python API: `train`, `evaluate`, `predict` — keyword-only, each returning a small result object."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from finetune.checkpoint import LoadedModel, load_checkpoint, model_from_checkpoint
from finetune.data import DatasetIndex, ImageDataset, list_images, make_index, make_loader, read_samples, scan_image_folder
from finetune.distributed import barrier, setup, teardown
from finetune.doctor import Screened, screen_samples, split_leakage
from finetune.errors import CheckpointError, DataError
from finetune.fit import FitContext, class_weights, FitState, fit, read_history, seed_everything, state_from_payload
from finetune.html_report import RunContext
from finetune.inference import Predictions, resolve_device, run_inference
from finetune.metrics import predictions_table
from finetune.model import build_model
from finetune.recipe import DataConfig, Recipe, load_recipe, recipe_from_dict, save_recipe
from finetune.report import Report, write_report
from finetune.transforms import build_eval_pipeline, build_train_pipeline, resolve_image_config, save_pipeline

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    history: pd.DataFrame
    report: Report | None  # None on torchrun ranks other than 0 (rank 0 writes the report)
    seconds: float


def _check_new_run(recipe: Recipe, out: Path, *, progress: bool) -> tuple[DatasetIndex, pd.DataFrame, pd.DataFrame]:
    """Refuse to overwrite work; scan, screen and split the data. Nothing is written yet."""
    if out.exists() and any(out.iterdir()):
        if (out / "checkpoints" / "last.pt").exists():
            raise CheckpointError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        if not (out / "recipe.yaml").exists():
            raise CheckpointError(f"output folder {out} is not empty; choose a new --out folder")
        log.info("%s holds a run that never finished an epoch; starting it again", out)
    screened = screen_samples(read_samples(recipe.data), policy=recipe.data.bad_images, progress=progress)
    index = make_index(screened.samples, recipe.data, seed=recipe.seed)
    if not (index.samples["split"] == "val").any():
        raise DataError("no validation images: set data.val_fraction above 0 or add a val/ folder")
    leaks = split_leakage(index.samples, screened.facts)
    if len(leaks):
        first = leaks.iloc[0]
        message = (f"{len(leaks)} duplicate pair(s) across splits (e.g. {first['path_a']} [{first['split_a']}] ~ "
                   f"{first['path_b']} [{first['split_b']}]); val/test scores may be inflated")
        if recipe.data.strict_split:
            raise DataError(message + "; remove the copies, or set data.group_pattern, or data.strict_split: false")
        log.warning("%s; listed in leakage.csv. HINT: run 'finetune check' and remove the copies", message)
    return index, screened.skipped, leaks


def _write_run_files(recipe: Recipe, index: DatasetIndex, out: Path, skipped: pd.DataFrame, leaks: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    skipped.to_csv(out / "skipped.csv", index=False)
    if len(leaks):
        leaks.to_csv(out / "leakage.csv", index=False)
    index.samples.to_csv(out / "splits.csv", index=False)
    (out / "classes.json").write_text(json.dumps(index.class_names, indent=1), encoding="utf-8")
    save_recipe(recipe, out / "recipe.yaml")  # last, atomically: a folder with recipe.yaml can be resumed


def _resume_run(run_dir: Path) -> tuple[Recipe, DatasetIndex, dict | None]:
    """The run's recipe, split and last checkpoint (None when it was stopped inside its first epoch)."""
    for name in ("recipe.yaml", "splits.csv", "classes.json"):
        if not (run_dir / name).exists():
            raise CheckpointError(f"cannot resume {run_dir}: {name} is missing, so it is no finetune run folder; start a new run instead")
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")), source=str(run_dir / "recipe.yaml"))
    samples = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    index = DatasetIndex(samples=samples, class_names=json.loads((run_dir / "classes.json").read_text(encoding="utf-8")))
    last = run_dir / "checkpoints" / "last.pt"
    return recipe, index, load_checkpoint(last) if last.exists() else None


_RESUME_FREE = {"data.num_workers"}  # settings a resumed run may change without changing its result


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _refuse_changed_recipe(stored: Recipe, recipe: Recipe | str | Path | None, overrides: Sequence[str], out: Path) -> None:
    """--resume with a recipe: it must be the run's own (up to settings that do not change results)."""
    if recipe is None:
        candidate = recipe_from_dict(stored.to_dict(), overrides=list(overrides))
    else:
        candidate = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides=list(overrides))
        candidate = candidate.model_copy(update={"data": candidate.data.model_copy(update={"path": stored.data.path})})
    old, new = _flatten(stored.to_dict()), _flatten(candidate.to_dict())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUME_FREE)
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        raise CheckpointError(f"--resume {out}: the recipe differs from the run's ({shown}); resume without a recipe, or start a new run")


def train(
    *,
    recipe: Recipe | str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[FitState], None] | None = None,
) -> TrainResult:
    """Fine-tune per `recipe` on `data`, writing the run folder `out`; `resume=True` continues `out`.

    Under `torchrun --nproc_per_node=N` every process calls this; they train data-parallel and rank 0 writes.
    """
    started = time.perf_counter()
    out = Path(out)
    if resume:
        stored, index, payload = _resume_run(out)
        if recipe is not None or overrides:
            _refuse_changed_recipe(stored, recipe, overrides, out)
        recipe = stored
        state = state_from_payload(payload) if payload is not None else None
        ranks = setup(recipe.train.device)
        progress = progress and ranks.main
        if ranks.main:
            read_history(out, up_to_epoch=state.epoch if state else 0)
        log.info("resuming %s after epoch %d", out, state.epoch if state else 0)
    else:
        if not isinstance(recipe, Recipe):
            if recipe is None:
                raise CheckpointError("train needs a recipe (e.g. recipes/quickstart.yaml), or resume=True with an existing run")
            recipe = load_recipe(recipe, overrides=list(overrides))
        elif overrides:
            recipe = recipe_from_dict(recipe.to_dict(), overrides=list(overrides))
        if data is not None:
            recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": Path(data)})})
        ranks = setup(recipe.train.device)
        progress = progress and ranks.main
        index, skipped, leaks = _check_new_run(recipe, out, progress=progress)
        payload, state = None, None

    seed_everything(recipe.seed)
    bundle = build_model(recipe.model, num_classes=len(index.class_names), load_pretrained=payload is None)
    if payload is not None:
        bundle.model.load_state_dict(payload["state_dict"])
    barrier()  # every rank has checked the folder and the data before rank 0 writes
    image = resolve_image_config(recipe.transforms, bundle.data_config)
    train_tf = build_train_pipeline(recipe.transforms, image, seed=recipe.seed)
    eval_tf = build_eval_pipeline(image)
    train_rows, val_rows = index.split("train"), index.split("val")
    weights = class_weights(recipe.loss, class_names=index.class_names, targets=index.targets(train_rows))
    if ranks.main:
        if not resume:  # only once data and weights are known to be usable
            _write_run_files(recipe, index, out, skipped, leaks)
        save_pipeline(train_tf, out / "train_transforms.yaml")
        save_pipeline(eval_tf, out / "eval_transforms.yaml")
        if weights is not None:
            (out / "class_weights.json").write_text(json.dumps(dict(zip(index.class_names, weights)), indent=1), encoding="utf-8")
    ctx = FitContext(
        class_weights=weights,
        recipe=recipe, class_names=index.class_names, image=image, run_dir=out, progress=progress, on_epoch_end=on_epoch_end,
        train_set=ImageDataset(train_rows["path"], index.targets(train_rows), train_tf),
        val_set=ImageDataset(val_rows["path"], index.targets(val_rows), eval_tf),
    )
    log.info("training %s on %d images (%d val) of %d classes -> %s", recipe.model.name, len(train_rows), len(val_rows), len(index.class_names), out)
    try:
        fit(bundle, ctx, state=state)
    finally:
        teardown()
    if not ranks.main:
        return TrainResult(run_dir=out, best_checkpoint=out / "checkpoints" / "best.pt", history=pd.DataFrame(), report=None,
                           seconds=time.perf_counter() - started)

    split = "test" if (index.samples["split"] == "test").any() else "val"
    rows = index.split(split)
    best = model_from_checkpoint(load_checkpoint(out / "checkpoints" / "best.pt"))
    report = _report_for(best, rows, out / "report", split=split, progress=progress, checkpoint=out / "checkpoints" / "best.pt",
                         screened_already=True)
    return TrainResult(run_dir=out, best_checkpoint=out / "checkpoints" / "best.pt", history=read_history(out),
                       report=report, seconds=time.perf_counter() - started)


def _checkpoint_path(run: Path) -> Path:
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise CheckpointError(f"run {run} does not exist; pass a run folder written by 'finetune train' or a .pt checkpoint")
    return run / "checkpoints" / "best.pt"


def _predict_rows(loaded: LoadedModel, paths: list[str], targets: list[int], *, batch_size: int, progress: bool, desc: str) -> Predictions:
    dataset = ImageDataset(paths, targets, build_eval_pipeline(loaded.image))
    loader = make_loader(dataset, batch_size=batch_size, num_workers=loaded.recipe.data.num_workers, shuffle=False, seed=0)
    device = resolve_device(loaded.recipe.train.device)
    preds, _ = run_inference(loaded.bundle.model.to(device), loader, device=device, paths=paths, progress=progress, desc=desc)
    return preds


def _report_for(loaded: LoadedModel, rows: pd.DataFrame, folder: Path, *, split: str, progress: bool, checkpoint: Path,
                screened_already: bool = False) -> Report:
    if screened_already:  # the run's own split was decoded before training
        screened = Screened(samples=rows, skipped=pd.DataFrame(columns=[*rows.columns, "reason"]), facts={})
    else:
        screened = screen_samples(rows, policy=loaded.recipe.data.bad_images, progress=progress)
    rows = screened.samples
    lookup = {name: i for i, name in enumerate(loaded.class_names)}
    unknown = sorted(set(rows["label"]) - set(lookup))
    if unknown:
        raise DataError(f"class folder(s) {unknown} are not classes of this model {loaded.class_names}; evaluate only on known classes")
    preds = _predict_rows(loaded, list(rows["path"]), [lookup[label] for label in rows["label"]],
                          batch_size=loaded.recipe.data.batch_size, progress=progress, desc="evaluate")
    title = f"{loaded.recipe.model.name} on {split} ({len(rows)} images)"
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "recipe.yaml").exists() else None
    skipped_train = len(pd.read_csv(run_dir / "skipped.csv")) if run_dir is not None and (run_dir / "skipped.csv").exists() else 0
    extra = {"unreadable images skipped": f"{len(screened.skipped)} in this evaluation, {skipped_train} in the run's data (skipped.csv)"}
    if run_dir is not None and (run_dir / "class_weights.json").exists():
        weights = json.loads((run_dir / "class_weights.json").read_text(encoding="utf-8"))
        extra["loss class weights"] = ", ".join(f"{name}: {value:.3g}" for name, value in weights.items())
    context = RunContext(meta=loaded.meta, run_dir=run_dir, split=split, extra=extra)
    folder.mkdir(parents=True, exist_ok=True)
    screened.skipped.to_csv(folder / "skipped.csv", index=False)
    return write_report(preds, loaded.class_names, folder, top_k=loaded.recipe.eval.top_k, title=title, context=context)


def evaluate(*, run: str | Path, data: str | Path, out: str | Path | None = None, progress: bool = True) -> Report:
    """Evaluate a run's best checkpoint on labelled images; writes the report into `out` (default RUN/report)."""
    checkpoint = _checkpoint_path(Path(run))
    loaded = model_from_checkpoint(load_checkpoint(checkpoint))
    samples = scan_image_folder(Path(data), extensions=[e.lower() for e in DataConfig().extensions])
    if (samples["split"] != "").any():
        split = "test" if (samples["split"] == "test").any() else "val"
        samples = samples[samples["split"] == split]
        if samples.empty:
            raise DataError(f"{data} has no test/ or val/ images to evaluate")
    else:
        split = Path(data).name
    folder = Path(out) if out is not None else (checkpoint.parent.parent / "report" if checkpoint.parent.name == "checkpoints" else checkpoint.parent / "report")
    return _report_for(loaded, samples.reset_index(drop=True), folder, split=split, progress=progress, checkpoint=checkpoint)


def predict(*, run: str | Path, inputs: Sequence[str | Path], out: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Classify image files and folders (searched recursively); returns and optionally writes a CSV."""
    extensions = [e.lower() for e in DataConfig().extensions]
    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += [str(p) for p in list_images(item, extensions)]
        elif item.is_file():
            paths.append(str(item))
        else:
            raise DataError(f"input {item} does not exist; pass image files or folders")
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(extensions)})")
    loaded = model_from_checkpoint(load_checkpoint(_checkpoint_path(Path(run))))
    screened = screen_samples(pd.DataFrame({"path": paths, "label": "", "split": ""}), policy=loaded.recipe.data.bad_images, progress=progress)
    paths = list(screened.samples["path"])
    if not paths:
        raise DataError(f"none of the {len(screened.skipped)} input image(s) could be decoded, e.g. {screened.skipped['path'].iloc[0]}")
    preds = _predict_rows(loaded, paths, [-1] * len(paths), batch_size=loaded.recipe.data.batch_size, progress=progress, desc="predict")
    table = predictions_table(preds, loaded.class_names, top_k=loaded.recipe.eval.top_k)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False, float_format="%.6f")
        log.info("wrote %d predictions to %s", len(table), out)
    return table
