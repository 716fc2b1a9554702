"""`finetune compare`: train several recipes on the same data and split, then rank them in a leaderboard."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.config.loading import load_recipe
from finetune.data.split import evaluation_split
from finetune.errors import UsageError
from finetune.files import read_text_table, write_table
from finetune.models.inspect import inspect_model
from finetune.run_dir import RunDir
from finetune.runs.train import train

log = logging.getLogger(__name__)


@dataclass
class CompareResult:
    folder: Path
    leaderboard: pd.DataFrame


def _run_names(recipes: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in recipes:
        name, n = path.stem, 2
        while name in names:
            name, n = f"{path.stem}-{n}", n + 1
        names.append(name)
    return names


def compare(
    *, recipes: Sequence[str | Path], data: str | Path, out: str | Path, overrides: Sequence[str] = (), progress: bool = True
) -> CompareResult:
    """Train each recipe into `out/<recipe>/` on the split made by the first; write leaderboard.csv/.md."""
    paths = [Path(r) for r in recipes]
    if len(paths) < 2:
        raise UsageError("compare needs at least two recipes, e.g. recipes/linear_probe.yaml recipes/last_stage.yaml")
    loaded = [load_recipe(r, overrides=list(overrides)) for r in paths]  # validate all before training any
    out = Path(out)
    manifest = out / "split_manifest.csv"
    rows = []
    for recipe, name in zip(loaded, _run_names(paths)):
        started = time.perf_counter()
        source = manifest if manifest.exists() else data
        result = train(recipe=recipe, data=source, out=out / name, progress=progress)
        if not manifest.exists():  # every later recipe sees exactly this split
            splits = read_text_table(RunDir(result.run_dir).splits)
            splits["path"] = [str(Path(p).resolve()) for p in splits["path"]]
            write_table(splits, manifest)
        if result.report is None:
            raise UsageError("compare runs in one process; start it without torchrun")
        classes = result.report.per_class
        worst = classes.loc[classes["recall"].idxmin()]
        info = inspect_model(name=recipe.model.name, recipe=recipe, num_classes=len(classes))
        trainable = max(sum(s.params for s in info.stages if s.trainable[i]) for i in range(len(info.stages[0].trainable)))
        metrics = result.report.metrics
        rows.append(
            {
                "recipe": name,
                "model": recipe.model.name,
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
                "worst_class": worst["class"],
                "worst_class_recall": float(worst["recall"]),
                "trainable_params": trainable,
                "epochs": len(result.history),
                "seconds": round(time.perf_counter() - started, 1),
                "report": f"{name}/report/summary.md",
            }
        )
        log.info("%s: accuracy %.4f, macro-F1 %.4f", name, metrics["accuracy"], metrics["macro_f1"])
    board = pd.DataFrame(rows).sort_values(["macro_f1", "accuracy"], ascending=False).reset_index(drop=True)
    write_table(board, out / "leaderboard.csv", float_format="%.4f")
    shown = board.assign(report=[f"[report]({r})" for r in board["report"]])
    evaluated_on = evaluation_split(read_text_table(manifest))
    (out / "leaderboard.md").write_text(
        f"# Leaderboard\n\n{len(board)} recipes on {data}, same {evaluated_on} split; best macro-F1 first.\n\n"
        + shown.to_markdown(index=False, floatfmt=".4f")
        + "\n",
        encoding="utf-8",
    )
    return CompareResult(folder=out, leaderboard=board)
