"""Commands that train: train (and --folds), demo, compare, audit, lr-find."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finetune.cli.base import Debug, Overrides, Quiet, app, echo, session, timestamped
from finetune.errors import UsageError

Model = Annotated[str | None, typer.Option(metavar="NAME", help="Another backbone for a quick try, e.g. resnet18 (model.name).")]
Epochs = Annotated[int | None, typer.Option(metavar="N", help="Train this many epochs in all (phases change in proportion).")]
EpochsScale = Annotated[
    float | None, typer.Option(metavar="F", help="Multiply every phase's epochs (e.g. 0.2), each keeping >= 1.")
]
MaxEpochs = Annotated[
    int | None, typer.Option(metavar="N", help="At most this many epochs in all (phases shrink in proportion).")
]


@app.command()
def train(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="Recipe YAML or a built-in name (finetune recipes); default: last_stage.", show_default=False),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Image folder (class sub-folders, or train/ val/ [test/]), CSV manifest, Label Studio JSON export or "
            "FiftyOne classification dataset folder."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder to create (default runs/RECIPE-TIME).")] = None,
    set_: Overrides = None,
    model: Model = None,
    epochs: Epochs = None,
    epochs_scale: EpochsScale = None,
    max_epochs: MaxEpochs = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run (or cross-validation) folder.")] = None,
    folds: Annotated[int | None, typer.Option(help="K-fold cross-validation: K runs in RUN/fold_k, cv_summary, oof/.")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train from a recipe; writes checkpoints, metrics.csv, progress.html (live) and report/ into the run folder."""
    with session(quiet, debug, resumable=True):
        if resume is None and recipe is None and data is None:
            raise UsageError("give a recipe (e.g. last_stage; 'finetune recipes' lists them) and --data D, or --resume RUN")
        if resume is None and out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("under torchrun every process must write to the same run folder: pass --out RUN")
        from finetune import api
        from finetune.config.builtin import DEFAULT_RECIPE

        run_dir = resume or out or timestamped(recipe.stem if recipe else DEFAULT_RECIPE)
        quick: dict[str, Any] = {"model": model, "epochs": epochs, "epochs_scale": epochs_scale, "max_epochs": max_epochs}
        if folds is not None or (resume is not None and (resume / "folds.csv").exists()):
            _cross_validate(recipe, data, run_dir, set_ or [], folds, quick, resume=resume is not None, quiet=quiet)
            return
        result = api.train(
            recipe=recipe, data=data, out=run_dir, overrides=set_ or [], resume=resume is not None, progress=not quiet, **quick
        )
        if result.report is not None:  # None on torchrun ranks other than 0
            echo(f"{result.report.headline} | report: {result.report.folder} | best checkpoint: {result.best_checkpoint}")


def _cross_validate(
    recipe: Path | None,
    data: Path | None,
    out: Path,
    overrides: list[str],
    folds: int | None,
    quick: dict[str, Any],
    *,
    resume: bool,
    quiet: bool,
) -> None:
    from finetune import api

    if resume and folds is not None:
        raise UsageError("--resume continues the folds the run was started with; leave out --folds")
    result = api.cross_validate(
        recipe=recipe,
        data=data,
        out=out,
        folds=5 if folds is None else folds,
        overrides=overrides,
        resume=resume,
        progress=not quiet,
        **quick,
    )
    mean, std = result.summary.set_index("fold").loc["mean"], result.summary.set_index("fold").loc["std"]
    echo(
        f"macro-F1 per fold {mean['macro_f1']:.4f} ± {std['macro_f1']:.4f} | out of fold: "
        f"{result.report.headline} | {result.run_dir / 'cv_summary.md'} | {result.report.folder / 'report.html'}"
    )


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/demo-TIME).")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Build data_examples/digits (scikit-learn's handwritten digits) and its leak-free split digits.csv; train quickstart."""
    with session(quiet, debug):
        begun = time.perf_counter()
        from finetune import api

        imported = time.perf_counter() - begun
        result = api.demo(out=out, progress=not quiet)
        if result.report is not None:
            metrics = result.report.metrics
            echo(
                f"demo: test accuracy {metrics['accuracy']:.4f} on {metrics['num_images']} digits in {imported + result.seconds:.0f} s "
                f"(importing {imported:.1f} s, {result.where_the_time_went()})\n"
                f"report: {result.report.folder}/summary.md (confusion_matrix.png, per_class.csv, ...)"
            )


@app.command()
def compare(
    recipes: Annotated[list[Path], typer.Argument(help="Two or more recipes: built-in names or YAML files (one with --models).")],
    data: Annotated[Path, typer.Option(help="Image folder or CSV manifest; every recipe gets the same split.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the runs and leaderboard (default runs/compare-TIME).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override applied to every recipe (repeatable).")
    ] = None,
    epochs_scale: EpochsScale = None,
    max_epochs: Annotated[
        int | None, typer.Option(metavar="N", help="At most this many epochs per recipe (phases shrink in proportion).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Train each recipe with seeds 0..N-1; adds mean ± sd per recipe.")] = 1,
    folds: Annotated[int | None, typer.Option(help="Cross-validate every recipe on the same K folds; rank out of fold.")] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated model names: every recipe trains once per model (any family).")
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train several recipes (or one over several models) on the same split and rank them: leaderboard.csv, .md and .html."""
    with session(quiet, debug):
        from finetune import api

        result = api.compare(
            recipes=recipes,
            data=data,
            out=out or timestamped("compare"),
            overrides=set_ or [],
            progress=not quiet,
            epochs_scale=epochs_scale,
            max_epochs=max_epochs,
            seeds=seeds,
            folds=folds,
            models=[m.strip() for m in models.split(",") if m.strip()] if models else [],
        )
        echo(result.readable().to_string(index=False))
        echo(f"leaderboard: {result.folder / 'leaderboard.html'} (and .md, .csv)")


@app.command()
def audit(
    data: Annotated[Path, typer.Argument(help="Image folder (class sub-folders, or train/ val/ [test/]) or CSV manifest.")],
    recipe: Annotated[Path, typer.Option(help="Recipe of the fold models; a frozen-backbone one (linear_probe) is fastest.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder for label_issues.csv, audit.html, ... (default runs/audit-TIME).")
    ] = None,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validation that predicts every image out of fold.")] = 5,
    set_: Overrides = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Find suspect labels (confident learning on out-of-fold predictions), overlapping classes, duplicates under
    two labels and outliers; writes label_issues.csv and audit.html."""
    with session(quiet, debug):
        from finetune import api

        result = api.audit(
            data=data, recipe=recipe, out=out or timestamped("audit"), folds=folds, overrides=set_ or [], progress=not quiet
        )
        echo(
            f"{len(result.issues)} suspect image(s) of {len(result.quality)}, {len(result.conflicts)} duplicate pair(s) under two "
            f"labels, label health {result.health:.1%} | {result.folder / 'label_issues.csv'} | {result.folder / 'audit.html'}"
        )


@app.command("lr-find")
def lr_find(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML; the range test uses its first phase.")],
    data: Annotated[Path | None, typer.Option(help="Image folder or CSV manifest.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for lr_find.csv and lr_find.png (default runs/lr-find-TIME).")] = None,
    set_: Overrides = None,
    steps: Annotated[int, typer.Option(min=5, help="Number of LR steps.")] = 100,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Exponential LR range test: loss vs LR curve (PNG + CSV) and a suggested learning rate."""
    with session(quiet, debug):
        from finetune import api

        result = api.find_lr(
            recipe=recipe, data=data, out=out or timestamped("lr-find"), overrides=set_ or [], steps=steps, progress=not quiet
        )
        caution = " (unreliable: see the warning above)" if result.warning else ""  # the reason is logged once
        echo(f"suggested lr: {result.suggestion:.3g}{caution} | curve: {result.folder / 'lr_find.png'}")
