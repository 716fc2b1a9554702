"""`finetune export`: the run's model as ONNX and/or TorchScript, with its preprocessing contract inside, and parity
with PyTorch measured on the run's own held-out images every time (export/parity.json); `--format hub` writes the
folder the Hugging Face Hub expects of a timm model (plus the ONNX file and a model card), `--push` uploads it."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config.loading import load_recipe
from finetune.data.split import evaluation_split
from finetune.deploy import export_folder, hub_format, hub_push, onnx_format, torchscript_format
from finetune.deploy.metadata import contract
from finetune.deploy.package import PackagedClassifier, image_batches
from finetune.deploy.parity import FP32_TOLERANCE, Parity, compare, measure
from finetune.errors import CheckpointError, FinetuneError, ModelError, ParityError, RunDirError, UsageError
from finetune.files import guarded, read_text_table, write_text
from finetune.inference.checkpoint import TrainedModel, load_trained, read_record
from finetune.reporting import model_card
from finetune.run_dir import RunDir
from finetune.runs.prepare import changed_settings

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript", "pt2", "both", "hub")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}
EXPORTERS = {"torchscript": "torch.jit.trace", "pt2": "torch.export (ExportedProgram)"}
INFORMATIVE = ("timm_transform",)  # parity entries reported, not enforced: another preprocessing, by design
CALIBRATION_IMAGES = 256  # training images that calibrate int8 activations


@dataclass
class ExportResult:
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # onnx / onnx-int8 / torchscript -> file
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    pushed: str | None = None  # the Hub commit's URL, after --push
    split: str = ""  # the held-out split parity is measured on
    work: Path = Path()  # where the files are written until the export is complete (a staging folder inside `folder`)


def written_names() -> frozenset[str]:
    """Every file name an export may write: the only names its manifest may list (and --overwrite may delete)."""
    return frozenset({*FILES.values(), "model.int8.onnx", "parity.json", hub_format.WEIGHTS, hub_format.CONFIG, model_card.CARD})


def _checkpoint(run: RunDir, which: str) -> Path:
    if not run.is_run():
        raise RunDirError(f"{run.root} is no finetune run folder (no recipe.yaml); pass the folder 'finetune train' wrote")
    path = {"best": run.best, "last": run.last}.get(which)
    if path is None:
        raise UsageError(f"--checkpoint {which}: choose best or last")
    if not path.exists():
        raise CheckpointError(f"{run.root} has no checkpoints/{path.name}: it never finished an epoch; train it first")
    if run.last.exists():
        last = read_record(run.last)
        if last.finished is False:
            raise RunDirError(
                f"{run.root} has not finished training (epoch {last.epoch}); "
                f"finish it with 'finetune train --resume {run.root}', then export"
            )
    return path


def _check_belongs(run: RunDir, path: Path, loaded: TrainedModel) -> None:
    """The checkpoint must be the run's own: its classes those of classes.json, its recipe that of recipe.yaml (up to
    settings that change no result); a checkpoint copied in from another run would be exported under this run's name
    and its parity measured on images of classes it never learnt."""
    reason = ""
    if run.classes.is_file():
        classes = run.class_names()[0]
        if classes != loaded.class_names:
            reason = f"its classes {loaded.class_names[:5]} are not the run's {classes[:5]}"
    if not reason:
        edits = changed_settings(load_recipe(run.recipe), loaded.recipe)
        reason = f"its recipe differs from the run's recipe.yaml ({edits})" if edits else ""
    if reason:
        raise CheckpointError(
            f"{path} does not belong to the run {run.root}: {reason}; put the run's own checkpoint back, or export "
            "the run that trained it"
        )


def _held_out(run: RunDir, loaded: TrainedModel) -> tuple[list[str], np.ndarray, str]:
    """The run's test images (else val) and their class indices: the real images parity is proven on."""
    splits = read_text_table(run.splits)
    split = evaluation_split(splits)
    rows = splits[splits["split"] == split]
    return list(rows["path"]), loaded.targets_of(rows["label"]), split


def _reference(package: PackagedClassifier) -> Any:
    @torch.inference_mode()
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = package(torch.from_numpy(images))
        return logits.numpy(), probs.numpy()

    return run


def _check_options(formats: str, quantize: str | None, push: str | None) -> list[str]:
    if formats not in FORMATS:
        raise UsageError(
            f"--format {formats}: choose onnx, torchscript or both (onnx and torchscript), or pt2 (torch.export) "
            "or hub (a Hugging Face Hub folder)"
        )
    if push is not None and formats != "hub":
        raise UsageError(f"--push uploads a Hub folder: add --format hub (not {formats})")
    if formats == "hub":
        hub_push.require_hub()
        if push is not None:
            hub_push.check_repo_id(push)
    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize}: the only choice is int8")
    wanted = {"both": ["onnx", "torchscript"], "hub": ["onnx"]}.get(formats, [formats])
    if quantize and "onnx" not in wanted:
        raise UsageError("--quantize int8 quantizes the ONNX file: use --format onnx or both")
    if "onnx" in wanted:
        onnx_format.require_onnx()
    return wanted


def export(
    *,
    run: str | Path,
    formats: str = "onnx",
    out: str | Path | None = None,
    checkpoint: str = "best",
    quantize: str | None = None,
    opset: int = onnx_format.DEFAULT_OPSET,
    overwrite: bool = False,
    max_accuracy_drop: float = 0.01,
    push: str | None = None,
    license: str = "other",
    progress: bool = True,
) -> ExportResult:
    """Export the run's checkpoint; parity on the run's test (else val) images is written to parity.json and enforced:
    fp32 files must agree on every top-1 and within 1e-4 in probability; int8 must lose at most `max_accuracy_drop`.

    `formats="hub"`: timm's Hub layout (model.safetensors, config.json), model.onnx, parity.json and README.md, a
    model card under `license`; `push` ("user/name") uploads the folder to that Hub model repository."""
    started = time.perf_counter()
    wanted = _check_options(formats, quantize, push)
    if "onnx" in wanted:
        onnx_format.check_opset(opset)
    folder_run = RunDir(Path(run))
    path = _checkpoint(folder_run, checkpoint)
    loaded = load_trained(path)
    _check_belongs(folder_run, path, loaded)
    if formats == "hub":  # what would stop the Hub folder half-way is checked before anything is written
        model_card.check_report(folder_run)
        hub_format.check_timm_architecture(loaded.recipe.model)
    folder = Path(out) if out is not None else folder_run.root / "export"
    result = ExportResult(folder=folder)
    with export_folder.claimed(folder, overwrite=overwrite, names=written_names(), reads=[folder_run.root]) as work:
        result.work = work
        _export_files(
            result, wanted, loaded, folder_run, opset=opset, hub=formats == "hub", drop=max_accuracy_drop if quantize else None
        )
        result.seconds = time.perf_counter() - started
        _finish(result, max_accuracy_drop)
        if formats == "hub":
            _card(result, folder_run, loaded, license=license, repo_id=push)
    result.work, result.files = folder, {kind: folder / file.name for kind, file in result.files.items()}
    if push is not None:
        result.pushed = hub_push.push_folder(folder, push)
    return result


def _export_files(
    result: ExportResult, wanted: list[str], loaded: TrainedModel, run: RunDir, *, opset: int, hub: bool, drop: float | None
) -> None:
    """Every wanted file into `result.work`, each held to parity with PyTorch on the run's held-out images; `drop`:
    quantize the ONNX file to int8, kept within that accuracy budget."""
    package = PackagedClassifier(loaded.bundle.model, loaded.image, loaded.temperature, loaded.task)
    paths, targets, split = _held_out(run, loaded)
    result.split = split
    for kind in wanted:
        exporter = onnx_format.exporter_name(opset) if kind == "onnx" else EXPORTERS[kind]
        meta = contract(loaded, exporter=exporter, weights="float32")
        file = result.work / FILES[kind]
        _write(kind, package, file, loaded, meta, opset)
        runner = _runner(kind, file)
        parity = _parity(package, runner, paths, targets, loaded)
        _stamp(kind, file, meta, parity, split)
        result.files[kind], result.parity[kind] = file, parity.to_dict()
    if drop is not None:
        _int8(result, package, loaded, run, paths, targets, split, opset, drop)
    if hub:
        _timm_folder(result, package, loaded, paths, targets, split)


def _timm_folder(
    result: ExportResult, package: PackagedClassifier, loaded: TrainedModel, paths: list[str], targets: np.ndarray, split: str
) -> None:
    """model.safetensors + config.json, loaded back by timm and held to fp32 parity on finetune's prepared images; how
    timm's own transform agrees is measured too (reported, not enforced)."""
    extra = {"temperature": loaded.temperature, "task": loaded.task.name, "probabilities": loaded.task.probability_rule}
    hub_format.write_timm_folder(loaded, result.work, extra=extra)
    timm_model = hub_format.load_timm_folder(result.work)
    reloaded = PackagedClassifier(timm_model, loaded.image, loaded.temperature, loaded.task)
    parity = _parity(package, _reference(reloaded), paths, targets, loaded)
    result.files["timm"], result.parity["timm"] = result.work / hub_format.WEIGHTS, parity.to_dict()
    result.files["config"] = result.work / hub_format.CONFIG
    reference = np.concatenate([_reference(package)(batch)[1] for batch in image_batches(paths, loaded.image)])
    theirs = hub_format.timm_probabilities(timm_model, paths, temperature=loaded.temperature, task=loaded.task)
    agreement = compare(reference, theirs, targets, len(loaded.class_names), loaded.task)
    result.parity["timm_transform"] = {**agreement.to_dict(), "split": split}


def _card(result: ExportResult, run: RunDir, loaded: TrainedModel, *, license: str, repo_id: str | None) -> None:
    name = repo_id.split("/")[-1] if repo_id else result.folder.resolve().name
    files = [
        (hub_format.WEIGHTS, "the weights, as timm's `" + hub_format.timm_name(loaded.recipe.model.name) + "` loads them"),
        (hub_format.CONFIG, "timm's config: architecture, classes, label names, preprocessing (and finetune's temperature)"),
        ("model.onnx", "the same model as ONNX: uint8 images in, logits and calibrated probabilities out"),
        ("parity.json", "the exported files against PyTorch on the held-out images"),
    ]
    if "onnx-int8" in result.files:
        files.insert(3, ("model.int8.onnx", "the ONNX model with int8 weights and activations (see parity.json)"))
    facts = model_card.gather(run, loaded, name=name, license=license, parity=result.parity, files=files)
    facts.repo_id = repo_id
    card = result.work / model_card.CARD
    write_text(card, model_card.card_text(facts))
    result.files["card"] = card


def _write(kind: str, package: PackagedClassifier, file: Path, loaded: TrainedModel, meta: dict[str, Any], opset: int) -> None:
    """One file; an exporter's failure is one line (the staging folder, and so the half-written file, is removed), and
    so is a full disk or a size limit, whichever exporter met it."""
    try:
        with guarded(file):
            if kind == "onnx":
                onnx_format.export_onnx(package, file, size=loaded.image.input_size, opset=opset)
            else:
                export = torchscript_format.export_torchscript if kind == "torchscript" else torchscript_format.export_program
                export(package, file, size=loaded.image.input_size, meta=meta)
    except (FinetuneError, OSError):
        raise
    except Exception as exc:  # torch.onnx, torch.export and torch.jit raise their own error classes
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[0] if lines else type(exc).__name__)[:200]
        at = f" at opset {opset}" if kind == "onnx" else ""
        hint = f"; try --opset {onnx_format.DEFAULT_OPSET}" if kind == "onnx" and opset != onnx_format.DEFAULT_OPSET else ""
        raise ModelError(
            f"{kind} export of {loaded.recipe.model.name}{at} failed ({detail}); nothing was written{hint}"
        ) from None


def _runner(kind: str, file: Path) -> Any:
    if kind == "onnx":
        return onnx_format.OnnxRunner(file)
    return torchscript_format.TorchScriptRunner(file) if kind == "torchscript" else torchscript_format.ProgramRunner(file)


def _parity(package: PackagedClassifier, runner: Any, paths: list[str], targets: np.ndarray, loaded: TrainedModel) -> Parity:
    return measure(_reference(package), runner, image_batches(paths, loaded.image), targets, len(loaded.class_names), loaded.task)


def _stamp(kind: str, file: Path, meta: dict[str, Any], parity: Parity, split: str) -> None:
    """Write the parity figures into the file's own metadata."""
    meta = {**meta, "parity": {**parity.to_dict(), "split": split}}
    with guarded(file):
        if kind.startswith("onnx"):
            onnx_format.write_metadata(file, meta)
        else:
            torchscript_format.write_metadata(file, meta)


def _int8(
    result: ExportResult,
    package: PackagedClassifier,
    loaded: TrainedModel,
    run: RunDir,
    paths: list[str],
    targets: np.ndarray,
    split: str,
    opset: int,
    max_accuracy_drop: float,
) -> None:
    """Static int8 quantization of the ONNX file, calibrated on training images; kept only within the accuracy budget."""
    source = result.files.get("onnx")
    if source is None:
        return
    splits = read_text_table(run.splits)
    train = list(splits.loc[splits["split"] == "train", "path"])[:CALIBRATION_IMAGES]
    target = result.work / "model.int8.onnx"
    with guarded(target):
        onnx_format.quantize_int8(source, target, image_batches(train, loaded.image))
    parity = _parity(package, onnx_format.OnnxRunner(target), paths, targets, loaded)
    result.parity["onnx-int8"] = parity.to_dict()
    if -parity.accuracy_delta > max_accuracy_drop:
        target.unlink()
        return
    meta = contract(loaded, exporter=f"onnxruntime quantize_static (QDQ, per-channel int8) of opset {opset}", weights="int8")
    _stamp("onnx-int8", target, meta, parity, split)
    result.files["onnx-int8"] = target


def _finish(result: ExportResult, max_accuracy_drop: float) -> None:
    """parity.json, then the verdict: exit 1 (files kept) when an export is not equal enough."""
    split = result.split
    report = {"split": split, "fp32_tolerance": FP32_TOLERANCE, "max_accuracy_drop": max_accuracy_drop, **result.parity}
    with guarded(result.work / "parity.json"):
        write_text(result.work / "parity.json", json.dumps(report, indent=2))
    for kind, figures in result.parity.items():
        if kind in INFORMATIVE:
            continue
        if kind == "onnx-int8":
            if "onnx-int8" not in result.files:
                drop, images = -figures["accuracy_delta"], figures["images"]
                raise ParityError(
                    f"int8 model not written: accuracy fell {100 * drop:.1f} points ({round(drop * images)} of {images} "
                    f"{split} images) against the allowed {100 * max_accuracy_drop:.1f}; to keep it, run the export again "
                    f"with --max-accuracy-drop {math.ceil(drop * 100 + 0.5) / 100:.2f} --overwrite; see {result.folder / 'parity.json'}"
                )
            continue
        if figures["top1_agreement"] < 1.0 or figures["max_abs_prob_diff"] > FP32_TOLERANCE:
            raise ParityError(
                f"{kind} export disagrees with PyTorch on the {split} split: {figures.get('agreement_of', 'top-1 class')} agreement {figures['top1_agreement']:.2%}, "
                f"max probability difference {figures['max_abs_prob_diff']:.2g}; files kept in {result.folder} for inspection"
            )
    log.info(
        "exported %s to %s in %.1fs; parity on %d %s images in parity.json",
        ", ".join(result.files),
        result.folder,
        result.seconds,
        next(iter(result.parity.values()))["images"],
        split,
    )
