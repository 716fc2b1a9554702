"""The `finetune` command: a thin typer skin over `finetune.api`. Errors become one line and exit code 2."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from finetune import __version__
from finetune.errors import FinetuneError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune ResNets on image folders from YAML recipes; evaluate and predict with the result.",
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, warnings only.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: --set train.epochs=3 (repeatable).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune ResNets on image folders from YAML recipes; evaluate and predict with the result."""


@contextlib.contextmanager
def _session(quiet: bool, debug: bool) -> Iterator[None]:
    """Logging for the command, and every FinetuneError as a single line with exit code 2."""
    follower = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for the job
    level = logging.ERROR if follower else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.basicConfig(level=level, format="%(message)s", force=True)
    try:
        yield
    except FinetuneError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; completed epochs are checkpointed: continue with 'finetune train --resume RUN'", err=True)
        raise typer.Exit(130) from None
    finally:  # called in-process (tests, notebooks), the command leaves logging as it found it
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def _timestamped(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def train(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML, e.g. recipes/last_stage.yaml.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Image folder (class sub-folders, or train/ val/ [test/]) or CSV manifest.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder to create (default runs/RECIPE-TIME).")] = None,
    set_: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run folder.")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train from a recipe; writes checkpoints, metrics.csv and report/ into the run folder."""
    with _session(quiet, debug):
        if resume is None and recipe is None:
            raise UsageError("give a recipe (e.g. recipes/quickstart.yaml) or --resume RUN")
        if resume is None and out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("under torchrun every process must write to the same run folder: pass --out RUN")
        from finetune import api

        run_dir = resume or out or _timestamped(recipe.stem if recipe else "run")
        result = api.train(
            recipe=recipe, data=data, out=run_dir, overrides=set_ or [], resume=resume is not None, progress=not quiet
        )
        if result.report is not None:  # None on torchrun ranks other than 0
            typer.echo(
                f"accuracy {result.report.metrics['accuracy']:.4f} | report: {result.report.folder} | "
                f"best checkpoint: {result.best_checkpoint}"
            )


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="Run folder (or a .pt checkpoint).")],
    data: Annotated[
        Path, typer.Option(help="Labelled image folder: class sub-folders, or train/val/test (test, else val, is used).")
    ],
    out: Annotated[Path | None, typer.Option(help="Report folder (default RUN/report).")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Evaluate a trained run on labelled images and write the report files."""
    with _session(quiet, debug):
        from finetune import api

        report = api.evaluate(run=run, data=data, out=out, progress=not quiet)
        typer.echo(
            f"accuracy {report.metrics['accuracy']:.4f} on {report.metrics['num_images']} images | report: {report.folder}"
        )


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder (or a .pt checkpoint).")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    out: Annotated[Path | None, typer.Option(help="CSV to write (default: print to the terminal).")] = None,
    min_confidence: Annotated[
        float | None, typer.Option(help="Answer 'unknown' below this (calibrated) top probability.")
    ] = None,
    reject: Annotated[
        str | None, typer.Option(help="'auto': choose the threshold on the validation split (--target-accuracy).")
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="With --reject auto: the accuracy the answered images should reach.")
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Classify images; CSV with path, predicted label, confidence and top-k (calibrated; optional reject option)."""
    with _session(quiet, debug):
        from finetune import api

        table = api.predict(
            run=run,
            inputs=inputs,
            out=out,
            progress=not quiet,
            min_confidence=min_confidence,
            reject=reject,
            target_accuracy=target_accuracy,
        )
        shown = table.to_csv(index=False, float_format="%.4f") if out is None else f"{len(table)} predictions written to {out}"
        typer.echo(shown, nl=out is not None)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/demo-TIME).")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Build data_examples/digits (scikit-learn's handwritten digits) and train recipes/quickstart.yaml on it."""
    with _session(quiet, debug):
        from finetune import api

        result = api.demo(out=out, progress=not quiet)
        if result.report is not None:
            metrics = result.report.metrics
            typer.echo(
                f"demo: test accuracy {metrics['accuracy']:.4f} on {metrics['num_images']} digits in {result.seconds:.0f}s\n"
                f"report: {result.report.folder}/summary.md (confusion_matrix.png, per_class.csv, ...)"
            )


@app.command()
def check(
    data: Annotated[Path, typer.Argument(help="Image folder (class sub-folders, or train/ val/ [test/]).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every finding to this JSON file.")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Dataset doctor: decode every file; unreadable, odd, duplicate and leaking images. Exit 1 if training would fail."""
    with _session(quiet, debug):
        from finetune import api
        from finetune.data.doctor import format_check

        result = api.check(data=data, json_out=json_out, progress=not quiet)
        typer.echo(format_check(result))
        if json_out is not None:
            typer.echo(f"findings: {json_out}")
    if not result.trainable:
        raise typer.Exit(1)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model name, e.g. resnet50 or tv:resnet50.")],
    recipe: Annotated[
        Path | None, typer.Option(help="Show trainable/frozen per phase of this recipe (and its input size).")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Input size in pixels (default: recipe, else the model's).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: Debug = False,
) -> None:
    """Parameters, GMACs and trainable/frozen per stage (stem, layer1..layer4, head)."""
    with _session(True, debug):
        import json

        from finetune import api
        from finetune.models.inspect import format_inspection

        info = api.inspect(model=model, recipe=recipe, input_size=input_size)
        typer.echo(json.dumps(info.to_dict(), indent=2) if json_ else format_inspection(info))


@app.command()
def compare(
    recipes: Annotated[list[Path], typer.Argument(help="Two or more recipe YAML files.")],
    data: Annotated[Path, typer.Option(help="Image folder or CSV manifest; every recipe gets the same split.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the runs and leaderboard (default runs/compare-TIME).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override applied to every recipe (repeatable).")] = None,
    epochs_scale: Annotated[
        float | None, typer.Option(help="Multiply every phase's epochs (e.g. 0.2), each keeping >= 1.")
    ] = None,
    max_epochs: Annotated[
        int | None, typer.Option(help="At most this many epochs per recipe (phases shrink in proportion).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Train each recipe with seeds 0..N-1; adds mean ± sd per recipe.")] = 1,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train several recipes on the same split and rank them: leaderboard.csv and leaderboard.md."""
    with _session(quiet, debug):
        from finetune import api

        result = api.compare(
            recipes=recipes,
            data=data,
            out=out or _timestamped("compare"),
            overrides=set_ or [],
            progress=not quiet,
            epochs_scale=epochs_scale,
            max_epochs=max_epochs,
            seeds=seeds,
        )
        typer.echo(result.leaderboard.drop(columns="report").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        typer.echo(f"leaderboard: {result.folder / 'leaderboard.md'}")


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
    with _session(quiet, debug):
        from finetune import api

        result = api.find_lr(
            recipe=recipe, data=data, out=out or _timestamped("lr-find"), overrides=set_ or [], steps=steps, progress=not quiet
        )
        caution = f" (unreliable: {result.warning})" if result.warning else ""
        typer.echo(f"suggested lr: {result.suggestion:.3g}{caution} | curve: {result.folder / 'lr_find.png'}")


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="Run folder (or a .pt checkpoint).")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the pictures and explanations.csv.")],
    class_: Annotated[str | None, typer.Option("--class", help="Explain this class (default: the predicted one).")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Grad-CAM: where in each image the model found its evidence (picture beside heatmap, border share in a CSV)."""
    with _session(quiet, debug):
        from finetune import api

        result = api.explain(run=run, inputs=inputs, out=out, target_class=class_, progress=not quiet)
        flagged = int((result.table["note"] != "").sum())
        typer.echo(f"{len(result.table)} explanation(s) in {result.folder} ({flagged} with most of the heat on the border)")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by 'finetune train'.")],
    format_: Annotated[str, typer.Option("--format", help="onnx, torchscript or both.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Folder for the files and parity.json (default RUN/export).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    quantize: Annotated[
        str | None, typer.Option(help="int8: onnxruntime static quantization, calibrated on training images.")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="int8: largest accuracy loss (0.01 = 1 point) before it is refused.")
    ] = 0.01,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Export to ONNX / TorchScript with the preprocessing contract inside; parity with PyTorch on real images (exit 1 if not equal)."""
    with _session(quiet, debug):
        from finetune import api

        result = api.export(
            run=run,
            formats=format_,
            out=out,
            checkpoint=checkpoint,
            quantize=quantize,
            opset=opset,
            overwrite=overwrite,
            max_accuracy_drop=max_accuracy_drop,
            progress=not quiet,
        )
        for kind, figures in result.parity.items():
            typer.echo(
                f"{kind}: top-1 agreement {figures['top1_agreement']:.2%}, max |p - p_torch| {figures['max_abs_prob_diff']:.2g}, "
                f"accuracy {figures['accuracy_exported']:.4f} ({figures['accuracy_delta']:+.4f}) on {figures['images']} images"
            )
        typer.echo(f"files: {', '.join(str(p) for p in result.files.values())} | parity: {result.folder / 'parity.json'}")


report_app = typer.Typer(help="Work with evaluation reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("diff")
def report_diff(
    run_a: Annotated[Path, typer.Argument(help="Run (or report) folder A, the baseline.")],
    run_b: Annotated[Path, typer.Argument(help="Run (or report) folder B, the change.")],
    out: Annotated[Path, typer.Option(help="Folder for diff.md, per_class_diff.csv, confusion_diff.csv/.png.")],
    debug: Debug = False,
) -> None:
    """Per-class metric deltas and confusion-matrix difference between two runs (B - A)."""
    with _session(False, debug):
        from finetune import api

        result = api.diff_reports(run_a=run_a, run_b=run_b, out=out)
        h = result.headline
        shown = h.assign(a=h["a"].map("{:.4f}".format), b=h["b"].map("{:.4f}".format), delta=h["delta"].map("{:+.4f}".format))
        typer.echo(shown[["metric", "a", "b", "delta", "verdict"]].to_string(index=False))
        typer.echo(f"diff: {result.folder / 'diff.md'}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="finetune")


if __name__ == "__main__":
    main()
