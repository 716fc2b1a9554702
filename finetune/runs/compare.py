"""`finetune compare`: train several recipes (or one recipe over several models) on the same data and split, then
rank them in a leaderboard with their size (parameters, GMACs), accuracy with its interval, and wall time. With
several labels per image (a manifest with a `labels` column) the runs are ranked by test mAP with its interval, and
each is tested against the leader by a paired bootstrap of the mAP difference on the same images."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.config.loading import load_recipe
from finetune.config.schema import Recipe
from finetune.data.split import evaluation_split
from finetune.errors import RunDirError, UsageError
from finetune.evaluation.intervals import Difference, paired_difference
from finetune.evaluation.multilabel import paired_multilabel_tables
from finetune.files import (
    atomic_write,
    guarded,
    path_key,
    published_together,
    read_table,
    read_text_table,
    write_table,
    write_text,
)
from finetune.inference.task import MultiLabel, SingleLabel, Task
from finetune.models.inspect import inspect_model
from finetune.reporting.leaderboard import leaderboard_markdown, leaderboard_table, write_leaderboard_html
from finetune.reporting.report import Report
from finetune.run_dir import RunDir, check_destination
from finetune.runs.cv import CVResult, cross_validate
from finetune.runs.prepare import QuickTry, changed_settings
from finetune.runs.train import train
from finetune.training.history import read_history

log = logging.getLogger(__name__)
FINISHED = "finished_runs.json"  # the runs done (name -> seconds): a rerun of the same compare continues from them
LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard_seeds.csv", "leaderboard.md", "leaderboard.html")


@dataclass
class CompareResult:
    folder: Path
    leaderboard: pd.DataFrame  # leaderboard.csv: plain numbers (seconds, parameter counts)
    task: Task = field(default_factory=SingleLabel)  # what the runs predict: names the leaderboard's metrics

    def readable(self) -> pd.DataFrame:
        """The leaderboard as people read it: '1 min 26 s', '11.2 M', accuracy (or mAP) with its interval."""
        return leaderboard_table(self.leaderboard, task=self.task)


def _run_names(stems: Sequence[str]) -> list[str]:
    names: list[str] = []
    for stem in stems:
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def _size(recipe: Recipe, classes: int) -> dict[str, Any]:
    """Parameters (all, and the most any phase trains) and GMACs of one forward at the recipe's input size."""
    info = inspect_model(name=recipe.model.name, recipe=recipe, num_classes=classes)
    trainable = max(sum(s.params for s in info.stages if s.trainable[i]) for i in range(len(info.stages[0].trainable)))
    return {"params": info.total_params, "gmacs": info.total_gmacs, "trainable_params": trainable}


def _scores(name: str, recipe: Recipe, report: Report) -> dict[str, Any]:
    """The leaderboard columns every row has: the task's headline (accuracy, or mAP with several labels per image) with
    its interval, macro-F1, the worst class (by recall, or by AP), the size."""
    family = report.task.metric_family
    classes, metrics = report.per_class, report.metrics
    by = classes[family.worst_class_by].dropna()  # AP is NaN for a class without a positive among these images
    worst = classes.loc[by.idxmin()] if len(by) else pd.Series({"class": "", family.worst_class_by: float("nan")})
    low, high = metrics["ci95"][family.headline]
    return {
        "recipe": name,
        "model": recipe.model.name,
        family.headline: metrics[family.headline],
        f"{family.headline}_lo": low,
        f"{family.headline}_hi": high,
        "macro_f1": metrics["macro_f1"],
        "worst_class": worst["class"],
        f"worst_class_{family.worst_class_by}": float(worst[family.worst_class_by]),
        **_size(recipe, len(classes)),
    }


def _finished(report: Report | None) -> Report:
    if report is None:
        raise UsageError("compare runs in one process; start it without torchrun")
    return report


def _row(name: str, recipe: Recipe, report: Report, epochs: int, seconds: float) -> dict[str, Any]:
    extra = {"epochs": epochs, "seconds": round(seconds, 1), "report": f"{name}/report/report.html"}
    return _scores(name, recipe, report) | extra


def _read_finished(out: Path) -> dict[str, float]:
    """The runs this compare finished before (name -> seconds it took): a rerun reads their reports back."""
    try:
        record = json.loads((out / FINISHED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _mark_finished(out: Path, name: str, seconds: float) -> None:
    text = json.dumps(_read_finished(out) | {name: round(seconds, 1)}, indent=1).encode()
    with guarded(out / FINISHED):
        atomic_write(out / FINISHED, lambda handle: handle.write(text))


def _same_recipe(run: RunDir, recipe: Recipe) -> None:
    """A run folder a previous compare left must hold this recipe: one leaderboard never mixes two settings."""
    stored = load_recipe(run.recipe)
    edits = changed_settings(stored, recipe.with_data(stored.data.path))
    if edits:
        raise RunDirError(
            f"{run.root} holds a run of another recipe ({edits}); run compare again as it started, or choose another --out"
        )


def _read_report(folder: Path) -> Report | None:
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        per_class = read_table(folder / "per_class.csv", dtype={"class": str}, keep_default_na=False)
    except (OSError, ValueError):
        return None
    return Report(folder=folder, metrics=metrics, per_class=per_class)


def _train_or_continue(
    recipe: Recipe, data: str | Path, run: RunDir, seconds: float | None, progress: bool
) -> tuple[Report | None, int]:
    """A run of a killed compare continued: read back when it finished, resumed when it had begun, else trained."""
    if not run.is_run():
        result = train(recipe=recipe, data=data, out=run.root, progress=progress)
        return result.report, len(result.history)
    _same_recipe(run, recipe)
    report = _read_report(run.report) if seconds is not None else None
    if report is not None:
        log.info("%s finished in an earlier compare: its report is read back", run.root)
        return report, len(read_history(run))
    result = train(out=run.root, resume=True, progress=progress)
    return result.report, len(result.history)


def _cv_row(name: str, recipe: Recipe, result: CVResult, seconds: float) -> dict[str, Any]:
    """A leaderboard row from out-of-fold figures, with the spread of the per-fold ones (of what the board ranks by)."""
    spread = result.summary.set_index("fold")
    epochs = [len(read_text_table(RunDir(result.run_dir).fold(k).metrics)) for k in range(1, len(spread) - 1)]
    ranked = result.report.task.metric_family.rank_by
    return _scores(name, recipe, result.report) | {
        f"{ranked}_fold_mean": spread.loc["mean", ranked],
        f"{ranked}_fold_std": spread.loc["std", ranked],
        "epochs": round(float(np.mean(epochs)), 1),
        "seconds": round(seconds, 1),
        "report": f"{name}/oof/report.html",
    }


def _predictions(run: RunDir) -> pd.DataFrame:
    """A run's report predictions (a cross-validation's out-of-fold ones) with absolute paths (the first run read the
    data as given, later ones the manifest)."""
    table = run.oof / "predictions.csv" if run.folds.exists() else run.report / "predictions.csv"
    frame = read_text_table(table)
    frame["path"] = [path_key(p) for p in frame["path"]]
    return frame


def _one_label_versus(leader: pd.DataFrame, other: pd.DataFrame) -> Difference | None:
    """Paired bootstrap of macro-F1, other - leader, on the leader's images; None when other predicts an unknown class."""
    classes = sorted(set(leader["true_label"]))
    index = {c: i for i, c in enumerate(classes)}
    other = other.set_index("path").loc[leader["path"]]
    codes = [
        np.array([index.get(v, -1) for v in column])
        for column in (leader["true_label"], leader["predicted_label"], other["predicted_label"])
    ]
    if (codes[2] < 0).any():
        return None
    return next(d for d in paired_difference(codes[0], codes[1], codes[2], len(classes)) if d.metric == "macro_f1")


def _several_labels_versus(leader: pd.DataFrame, other: pd.DataFrame) -> Difference | None:
    """Paired bootstrap of mAP, other - leader, on the same images; None when the two scored other images or sets."""
    return next((d for d in paired_multilabel_tables(leader, other) if d.metric == "mean_average_precision"), None)


VERSUS_LEADER = {SingleLabel.name: _one_label_versus, MultiLabel.name: _several_labels_versus}  # each task's paired test


def _versus_leader(out: Path, board: pd.DataFrame, task: Task) -> list[str]:
    """Each run against the leader on the same test images (a paired bootstrap of what the board is ranked by:
    macro-F1, or mAP with several labels per image): 'within noise' or not."""
    predictions = {name: _predictions(RunDir(out / name)) for name in board["recipe"]}
    leader = predictions[board["recipe"].iloc[0]]
    verdicts = ["leader"]
    for name in board["recipe"].iloc[1:]:
        diff = VERSUS_LEADER[task.name](leader, predictions[name])
        if diff is None:
            verdicts.append("not comparable")
            continue
        verdicts.append(
            f"{diff.observed:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]: {'within noise' if not diff.significant else 'worse'}"
        )
    return verdicts


def compare(
    *,
    recipes: Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    progress: bool = True,
    epochs_scale: float | None = None,
    max_epochs: int | None = None,
    seeds: int = 1,
    folds: int | None = None,
    models: Sequence[str] = (),
) -> CompareResult:
    """Train each recipe into `out/<recipe>/` on the split made by the first; write leaderboard.csv/.md/.html.

    Run again with the same arguments, a killed compare continues: finished runs are read back, an interrupted one
    is resumed, the rest are trained (a run folder holding another recipe is refused).

    `models` trains every recipe once per model name (`model.name` overridden, `out/<model>/`, or
    `out/<recipe>-<model>/` with several recipes): one recipe over backbones of any families in one leaderboard.

    `epochs_scale` multiplies every phase's epochs and `max_epochs` caps each recipe's total (phases shrink in
    proportion), so phase-based and one-phase recipes shorten together. `seeds` > 1 trains each recipe with seeds
    0..N-1 (`out/<recipe>-seed<k>/`) and adds the mean and spread per recipe. `folds` cross-validates every recipe
    on the same folds (`out/<recipe>/fold_k/`) and ranks them by their out-of-fold predictions.

    A manifest with a `labels` column (several labels per image) ranks the runs by mAP, each tested against the
    leader by a paired bootstrap of the mAP difference on the same images, the worst class being the one of least AP.
    """
    paths = [Path(r) for r in recipes]
    if len(paths) * max(len(models), 1) < 2:
        raise UsageError(
            "compare needs at least two recipes, e.g. recipes/linear_probe.yaml recipes/last_stage.yaml, "
            "or one recipe and --models, e.g. --models resnet18,convnext_atto"
        )
    if folds is not None and seeds > 1:
        raise UsageError("give --folds K or --seeds N, not both (folds already train every recipe K times)")
    read, stems = _recipes_over_models(paths, models, overrides)
    shorter = QuickTry(epochs_scale=epochs_scale, max_epochs=max_epochs)
    loaded = [shorter.apply(recipe, path) for recipe, path in read]
    out = check_destination(out, holds_runs=True)
    runs = _runs(loaded, _run_names(stems), seeds)
    trained = _train_folds(runs, data, out, folds, progress) if folds is not None else _train_all(runs, data, out, progress)
    rows, task = [row for row, _ in trained], trained[0][1]
    family = task.metric_family
    board = pd.DataFrame(rows).sort_values([family.rank_by, family.tiebreak], ascending=False).reset_index(drop=True)
    board["vs_leader"] = _versus_leader(out, board, task)
    split = f"{folds}-fold out-of-fold" if folds else evaluation_split(read_text_table(out / "split_manifest.csv"))
    means = seed_summary(board, task=task) if seeds > 1 else None
    with published_together(out, LEADERBOARD_FILES) as staging:  # a kill leaves the previous leaderboard whole
        write_table(board, staging / "leaderboard.csv", float_format="%.4f")
        if means is not None:
            write_table(means, staging / "leaderboard_seeds.csv", float_format="%.4f")
        markdown = leaderboard_markdown(board, data=data, split=split, means=means, seeds=seeds, task=task)
        write_text(staging / "leaderboard.md", markdown)
        write_leaderboard_html(board, staging / "leaderboard.html", data=data, split=split, means=means, seeds=seeds, task=task)
    return CompareResult(folder=out, leaderboard=board, task=task)


def _train_all(runs: list[tuple[Recipe, str]], data: str | Path, out: Path, progress: bool) -> list[tuple[dict[str, Any], Task]]:
    """Each recipe trained once; the first one's split (split_manifest.csv) is every later one's. Each leaderboard row
    comes with the task its report was scored for."""
    manifest = out / "split_manifest.csv"
    finished = _read_finished(out)
    rows = []
    for recipe, name in runs:
        started = time.perf_counter()
        run = RunDir(out / name)
        trained, epochs = _train_or_continue(recipe, manifest if manifest.exists() else data, run, finished.get(name), progress)
        report = _finished(trained)
        if not manifest.exists():  # every later recipe sees exactly this split
            splits = read_text_table(run.splits)
            splits["path"] = [path_key(p) for p in splits["path"]]
            # splits.csv names the label column 'label'; a manifest of several labels per image reads 'labels'
            write_table(splits.rename(columns={"label": report.task.metric_family.manifest_column}), manifest)
        seconds = finished.get(name, time.perf_counter() - started)
        _mark_finished(out, name, seconds)
        rows.append((_row(name, recipe, report, epochs, seconds), report.task))
        log.info("%s: %s, macro-F1 %.4f", name, report.headline, report.metrics["macro_f1"])
    return rows


def _train_folds(
    runs: list[tuple[Recipe, str]], data: str | Path, out: Path, folds: int, progress: bool
) -> list[tuple[dict[str, Any], Task]]:
    """Each recipe cross-validated; the first one's folds (its folds.csv) are every later one's."""
    assignment: pd.DataFrame | None = None
    rows = []
    for recipe, name in runs:
        started = time.perf_counter()
        run = RunDir(out / name)
        if run.folds.exists():  # a killed compare: finished folds are kept, the others trained
            _same_recipe(run, recipe)
            result = cross_validate(out=run.root, resume=True, progress=progress)
        else:
            result = cross_validate(recipe=recipe, data=data, out=run.root, folds=folds, progress=progress, assignment=assignment)
        if assignment is None:
            assignment = read_text_table(RunDir(result.run_dir).folds).astype({"fold": int})
        rows.append((_cv_row(name, recipe, result, time.perf_counter() - started), result.report.task))
        log.info("%s: out-of-fold %s, macro-F1 %.4f", name, result.report.headline, result.report.metrics["macro_f1"])
    return rows


def _recipes_over_models(
    paths: list[Path], models: Sequence[str], overrides: Sequence[str]
) -> tuple[list[tuple[Recipe, Path]], list[str]]:
    """(recipe, its file) per run and the run's folder stem: each recipe, or each recipe with each model name."""
    if len(set(models)) != len(models):
        raise UsageError(f"--models {','.join(models)}: each model once")
    if not models:
        return [(load_recipe(p, overrides=list(overrides)), p) for p in paths], [p.stem for p in paths]
    loaded, stems = [], []
    for path in paths:
        for model in models:
            recipe = load_recipe(path, overrides=[*overrides, f"model.name={model}"])
            if isinstance(recipe.model.pretrained, Path) and len(models) > 1:
                raise UsageError(
                    f"{path}: model.pretrained is the file {recipe.model.pretrained}, which fits one architecture, not "
                    f"{len(models)}; --set model.pretrained=true (each model's hub weights) or false"
                )
            loaded.append((recipe, path))
            folder = model.replace(":", "_")  # tv:resnet18 -> tv_resnet18
            stems.append(folder if len(paths) == 1 else f"{path.stem}-{folder}")
    return loaded, stems


def _runs(recipes: list[Recipe], names: list[str], seeds: int) -> list[tuple[Recipe, str]]:
    """(recipe, run folder name) for every recipe and seed."""
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: at least 1")
    if seeds == 1:
        return list(zip(recipes, names))
    return [(r.model_copy(update={"seed": s}), f"{n}-seed{s}") for r, n in zip(recipes, names) for s in range(seeds)]


def seed_summary(board: pd.DataFrame, *, task: Task = SingleLabel()) -> pd.DataFrame:
    """Mean and standard deviation over seeds per recipe (runs named '<recipe>-seed<k>') of the task's headline
    (accuracy, or mAP) and of macro-F1, best first by what the board is ranked by."""
    family = task.metric_family
    score = family.headline
    recipe = board["recipe"].str.replace(r"-seed\d+$", "", regex=True)
    grouped = board.assign(recipe=recipe).groupby("recipe")
    summary = grouped.agg(
        runs=(score, "size"),
        **{
            f"{score}_mean": (score, "mean"),
            f"{score}_std": (score, "std"),
            f"{score}_ci_lo_mean": (f"{score}_lo", "mean"),
            f"{score}_ci_hi_mean": (f"{score}_hi", "mean"),
        },
        macro_f1_mean=("macro_f1", "mean"),
        macro_f1_std=("macro_f1", "std"),
        seconds_mean=("seconds", "mean"),
    )
    return summary.sort_values(f"{family.rank_by}_mean", ascending=False).reset_index()
