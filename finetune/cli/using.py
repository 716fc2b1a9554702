"""Commands that use a trained run or a data folder: eval, predict, label, merge-labels, check, shard, inspect, explain,
export, report diff."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.base import HELP_STYLE, Debug, Overrides, Quiet, app, echo, session


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="Run folder (or a .pt checkpoint).")],
    data: Annotated[
        Path,
        typer.Option(
            help="Labelled images: class sub-folders or train/val/test (test, else val, is used), a CSV manifest, a Label "
            "Studio JSON export or a FiftyOne classification dataset folder."
        ),
    ],
    out: Annotated[Path | None, typer.Option(help="Report folder (default RUN/report).")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Evaluate a trained run on labelled images and write the report files."""
    with session(quiet, debug):
        from finetune import api

        report = api.evaluate(run=run, data=data, out=out, progress=not quiet)
        echo(f"{report.headline} on {report.metrics['num_images']} images | report: {report.folder}")


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
    with session(quiet, debug):
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
        echo(shown, nl=out is not None)


@app.command()
def label(
    run: Annotated[Path, typer.Argument(help="Run folder (or a .pt checkpoint).")],
    unlabeled: Annotated[
        Path, typer.Option(help="Unlabelled images: a folder (searched recursively) or a CSV with a 'path' column.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for predictions.csv, pseudo_labels.csv, to_label.csv and label.html.")],
    target_precision: Annotated[
        float,
        typer.Option(
            help="Pseudo-labels keep the confidence at which the validation precision's 95% Wilson lower bound reaches this."
        ),
    ] = 0.95,
    budget: Annotated[int, typer.Option(help="How many images to queue for labelling next (to_label.csv).")] = 50,
    image_root: Annotated[
        str | None,
        typer.Option(
            help="URL prefix under which Label Studio finds the unlabelled folder's images (label_studio_tasks.json); "
            "default: Label Studio's local-files route with absolute paths."
        ),
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Pseudo-label the images the run is sure of; queue the most useful ones to label next (uncertain and diverse)."""
    with session(quiet, debug):
        from finetune import api

        result = api.label(
            run=run,
            unlabeled=unlabeled,
            out=out,
            target_precision=target_precision,
            budget=budget,
            image_root=image_root,
            progress=not quiet,
        )
        summary = result.summary
        echo(
            f"{summary['pseudo_labels']} of {summary['images']} pseudo-labelled (validation precision "
            f"{summary['validation_precision']:.1%}), {summary['queued']} to label next | {result.folder / 'label.html'}"
        )


@app.command("merge-labels")
def merge_labels(
    run: Annotated[Path, typer.Argument(help="Run folder whose splits.csv holds the labelled images.")],
    out: Annotated[Path, typer.Option(help="The merged CSV manifest to write (path,label,split,source,confidence).")],
    pseudo_labels: Annotated[
        Path | None, typer.Option(help="finetune label's pseudo_labels.csv (or its --out folder): added to train.")
    ] = None,
    labelled: Annotated[
        list[Path] | None,
        typer.Option(
            help="New labels (repeatable): a CSV manifest, Label Studio JSON export, FiftyOne folder or class folders; "
            "added to train."
        ),
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """One manifest for the next train: the run's images keep their split, new labels and pseudo-labels go to train."""
    with session(quiet, debug):
        from finetune import api

        result = api.merge_labels(run=run, out=out, pseudo_labels=pseudo_labels, labelled=labelled or [], progress=not quiet)
        c = result.counts
        echo(
            f"{len(result.rows)} images ({c['labelled']} labelled, {c['new']} new, {c['pseudo']} pseudo) | train "
            f"{c['train_images']}, val {c['val_images']}, test {c['test_images']} | {result.manifest}"
        )


@app.command()
def check(
    data: Annotated[
        Path,
        typer.Argument(
            help="Image folder (class sub-folders, or train/ val/ [test/]), a Label Studio JSON export or a FiftyOne classification dataset folder."
        ),
    ],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every finding to this JSON file.")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Dataset doctor: decode every file; unreadable, odd, duplicate and leaking images. Exit 1 if training would fail."""
    with session(quiet, debug):
        from finetune.data.doctor import format_check
        from finetune.runs.check import check as check_data  # not finetune.api: torch would add ~0.9 GiB to a 1M-image check

        result = check_data(data=data, json_out=json_out, progress=not quiet)
        echo(format_check(result))
        if json_out is not None:
            echo(f"findings: {json_out}")
    if not result.trainable:
        raise typer.Exit(1)


@app.command()
def shard(
    data: Annotated[Path, typer.Argument(help="Image folder (class sub-folders, or train/ val/ [test/]) or CSV manifest.")],
    out: Annotated[Path, typer.Option(help="New (or empty) folder for the shards, shards.json and samples.csv.")],
    shard_size: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    recipe: Annotated[Path | None, typer.Option(help="Recipe whose data.* settings and seed give the split.")] = None,
    set_: Overrides = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Screen and split images as train does, and write them as WebDataset tar shards (train with --data OUT)."""
    with session(quiet, debug):
        from finetune import api

        result = api.shard(data=data, out=out, shard_size=shard_size, recipe=recipe, overrides=set_ or [], progress=not quiet)
        sizes = ", ".join(f"{split} {count}" for split, count in result.splits.items())
        echo(f"{result.shards} shard(s) ({sizes}; {result.skipped} skipped) | {result.out / 'shards.json'}")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model name, e.g. resnet50 or tv:resnet50.")],
    recipe: Annotated[
        Path | None, typer.Option(help="Show trainable/frozen per phase of this recipe (and its input size).")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Input size in pixels (default: recipe, else the model's).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Parameters, GMACs and trainable/frozen per stage (stem, layer1..layer4, head)."""
    with session(True, debug):
        import json

        from finetune import api
        from finetune.models.inspect import format_inspection

        info = api.inspect(model=model, recipe=recipe, input_size=input_size)
        echo(json.dumps(info.to_dict(), indent=2) if json_ else format_inspection(info))


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
    with session(quiet, debug):
        from finetune import api

        result = api.explain(run=run, inputs=inputs, out=out, target_class=class_, progress=not quiet)
        flagged = int((result.table["note"] != "").sum())
        echo(f"{len(result.table)} explanation(s) in {result.folder} ({flagged} with most of the heat on the border)")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by 'finetune train'.")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx, torchscript, pt2 (torch.export), both (onnx and torchscript), or hub (a timm folder for the "
            "Hugging Face Hub: weights, config, ONNX, model card).",
        ),
    ] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Folder for the files and parity.json (default RUN/export).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    quantize: Annotated[
        str | None, typer.Option(help="int8: onnxruntime static quantization, calibrated on training images.")
    ] = None,
    opset: Annotated[
        int, typer.Option(help="ONNX opset (18 and up: the torch.export-based exporter; below: the older one).")
    ] = 18,  # deploy.onnx_format.DEFAULT_OPSET (not imported: --help stays torch-free)
    overwrite: Annotated[
        bool, typer.Option(help="Replace the previous export in --out (only the files its export_manifest.json lists).")
    ] = False,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="int8: largest accuracy loss (0.01 = 1 point) before it is refused.")
    ] = 0.01,
    push: Annotated[
        str | None, typer.Option(help="hub: upload the folder to this Hub model repository (USER/NAME), created if needed.")
    ] = None,
    license: Annotated[str, typer.Option(help="hub: the model card's license (a Hub license id such as apache-2.0).")] = "other",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Export to ONNX / TorchScript with the preprocessing contract inside; parity with PyTorch on real images (exit 1 if not equal)."""
    with session(quiet, debug):
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
            push=push,
            license=license,
            progress=not quiet,
        )
        for kind, figures in result.parity.items():
            echo(
                f"{kind}: {figures.get('agreement_of', 'top-1 class')} agreement {figures['top1_agreement']:.2%}, max |p - p_torch| {figures['max_abs_prob_diff']:.2g}, "
                f"accuracy {figures['accuracy_exported']:.4f} ({figures['accuracy_delta']:+.4f}) on {figures['images']} images"
            )
        echo(f"files: {', '.join(str(p) for p in result.files.values())} | parity: {result.folder / 'parity.json'}")
        if result.pushed:
            echo(f"pushed to the Hub: {result.pushed}")


report_app = typer.Typer(help="Work with evaluation reports.", no_args_is_help=True, **HELP_STYLE)
app.add_typer(report_app, name="report")


@report_app.command("diff")
def report_diff(
    run_a: Annotated[Path, typer.Argument(help="Run (or report) folder A, the baseline.")],
    run_b: Annotated[Path, typer.Argument(help="Run (or report) folder B, the change.")],
    out: Annotated[Path, typer.Option(help="Folder for diff.html, diff.md, per_class_diff.csv, confusion_diff.csv/.png.")],
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Per-class metric deltas and confusion-matrix difference between two runs (B - A)."""
    with session(quiet, debug):
        from finetune import api

        result = api.diff_reports(run_a=run_a, run_b=run_b, out=out)
        h = result.headline
        shown = h.assign(a=h["a"].map("{:.4f}".format), b=h["b"].map("{:.4f}".format), delta=h["delta"].map("{:+.4f}".format))
        echo(shown[["metric", "a", "b", "delta", "verdict"]].to_string(index=False))
        echo(f"diff: {result.folder / 'diff.html'} (and diff.md)")
