"""Exported models against PyTorch eager inference, in one process: onnxruntime fp32 and int8, ResNet-18 and ResNet-50
at 224 px, batch 1 and 32 (the same uint8 input to all three, medians over repeats), the export's own wall time, and
the int8 model's accuracy change on a hymenoptera run; and (issue 20) the maintained exporters against the deprecated
ones they replace, in the same run: torch.onnx.export(dynamo=True) at opset 18 against the TorchScript-based exporter at
opset 17, and a torch.export ExportedProgram (.pt2) against torch.jit.trace, on a tiny ResNet (timm test_resnet, 64 px)
and ResNet-18 at 224 px: export time, max |probability| and |logit| difference to eager, ORT fp32 / int8 speed.

Targets (issue 12): ORT fp32 >= 1.3x eager, int8 >= 2x, int8 accuracy within 1 point. Issue 20: fp32 parity of every
exported file within the gate's 1e-4.
Run: python benchmarks/bench_export.py   (needs ../shared/datasets/hymenoptera for the accuracy figure)
     python benchmarks/bench_export.py --exporters-only   (the issue 20 comparison alone, a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from finetune import export, train
from finetune.config.loading import recipe_from_dict
from finetune.data.transforms import ImageConfig
from finetune.deploy import onnx_format, torchscript_format
from finetune.deploy.package import PackagedClassifier
from finetune.deploy.parity import FP32_TOLERANCE

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
IMAGE = ImageConfig(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(model_name: str, folder: Path, *, repeats: int) -> dict[str, float]:
    """img/s of eager, ORT fp32 and ORT int8 at batch 1 and 32, and the export + quantization wall times."""
    package = PackagedClassifier(timm.create_model(model_name, num_classes=10).eval(), IMAGE, temperature=1.0).eval()
    fp32, int8 = folder / f"{model_name}.onnx", folder / f"{model_name}.int8.onnx"
    started = time.perf_counter()
    onnx_format.export_onnx(package, fp32, size=224)
    exported = time.perf_counter() - started
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    onnx_format.quantize_int8(fp32, int8, iter([rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8) for _ in range(4)]))
    quantized = time.perf_counter() - started
    threads = torch.get_num_threads()
    runners = {"fp32": onnx_format.OnnxRunner(fp32, threads=threads), "int8": onnx_format.OnnxRunner(int8, threads=threads)}
    figures = {"export_s": exported, "quantize_s": quantized}
    for batch in (1, 32):
        images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        with torch.inference_mode():
            eager = _median_seconds(lambda images=images: package(torch.from_numpy(images)), repeats)
        figures[f"eager_b{batch}"] = batch / eager
        for name, runner in runners.items():
            figures[f"{name}_b{batch}"] = batch / _median_seconds(lambda runner=runner, images=images: runner(images), repeats)
    return figures


def int8_accuracy(folder: Path) -> dict[str, float]:
    """Train last_stage (ResNet-18 from a random weights file: no hub here) on hymenoptera, export it with int8."""
    weights = folder / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    recipe = recipe_from_dict(
        {
            "seed": 0,
            "data": {"path": str(DATA), "batch_size": 32, "num_workers": 2},
            "model": {"name": "resnet18", "pretrained": str(weights)},
            "transforms": {"train": "light"},
            "train": {"epochs": 3, "lr": 0.001, "trainable": ["layer4", "head"]},
        }
    )
    run = train(recipe=recipe, out=folder / "run", progress=False).run_dir
    result = export(run=run, quantize="int8", progress=False, max_accuracy_drop=1.0)
    return json.loads((result.folder / "parity.json").read_text())["onnx-int8"] | {"export_s": result.seconds}


def _spread_package(model_name: str, size: int) -> PackagedClassifier:
    """Random weights, but spread BatchNorm statistics and a 40x classifier, so that logits span about +-6 and top
    probabilities sit near 0.75 (at temperature 1.5), where a probability difference shows."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.running_mean is not None and module.running_var is not None:
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(40.0)  # the classifier
    image = ImageConfig(input_size=size, mean=IMAGE.mean, std=IMAGE.std)
    return PackagedClassifier(model.eval(), image, temperature=1.5).eval()


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _diffs(reference: tuple[torch.Tensor, torch.Tensor], found: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """max |probability| and max |logit| difference."""
    return float(np.abs(found[1] - reference[1].numpy()).max()), float(np.abs(found[0] - reference[0].numpy()).max())


SUFFIXES = {"onnx-legacy": "onnx", "onnx-dynamo": "onnx", "torchscript": "pt", "pt2": "pt2"}
EXPORTERS = {  # name -> (writer, runner): the maintained path and the deprecated one it replaces
    "onnx-legacy": (lambda p, f, s: onnx_format.export_onnx(p, f, size=s, opset=17), onnx_format.OnnxRunner),
    "onnx-dynamo": (lambda p, f, s: onnx_format.export_onnx(p, f, size=s, opset=18), onnx_format.OnnxRunner),
    "torchscript": (
        lambda p, f, s: torchscript_format.export_torchscript(p, f, size=s, meta={}),
        torchscript_format.TorchScriptRunner,
    ),
    "pt2": (lambda p, f, s: torchscript_format.export_program(p, f, size=s, meta={}), torchscript_format.ProgramRunner),
}


def compare_exporters(model_name: str, size: int, folder: Path, *, repeats: int) -> dict[str, dict[str, float]]:
    """Each exporter on one model: median export seconds (alternating, after a warm-up call whose time is kept as
    'first_s'), parity with eager on 16 random uint8 images, ORT img/s at batch 32 for the ONNX files, and int8."""
    package = _spread_package(model_name, size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        reference = package(torch.from_numpy(images))
    figures: dict[str, dict[str, float]] = {name: {} for name in EXPORTERS}
    times: dict[str, list[float]] = {name: [] for name in EXPORTERS}
    files = {name: folder / f"{model_name}-{size}-{name}.{SUFFIXES[name]}" for name in EXPORTERS}
    for attempt in range(repeats + 1):
        for name, (write, _) in EXPORTERS.items():
            seconds = _timed(lambda write=write, name=name: write(package, files[name], size))
            figures[name].setdefault("first_s", seconds)
            if attempt:
                times[name].append(seconds)
    batch = rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    for name, (_, opener) in EXPORTERS.items():
        runner = opener(files[name])
        figures[name]["export_s"] = statistics.median(times[name])
        figures[name]["prob_diff"], figures[name]["logit_diff"] = _diffs(reference, runner(images))
        if name.startswith("onnx"):
            int8 = files[name].with_suffix(".int8.onnx")
            calibration = iter([rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8) for _ in range(4)])
            figures[name]["quantize_s"] = _timed(
                lambda name=name, int8=int8, c=calibration: onnx_format.quantize_int8(files[name], int8, c)
            )
            figures[name]["int8_prob_diff"] = _diffs(reference, onnx_format.OnnxRunner(int8)(images))[0]
            for kind, path in (("fp32", files[name]), ("int8", int8)):
                session = onnx_format.OnnxRunner(path, threads=threads)
                figures[name][f"{kind}_b32"] = 32 / _median_seconds(lambda s=session: s(batch), repeats)
    return figures


def _describe(label: str, name: str, g: dict[str, float]) -> str:
    line = f"{label} {name}: export {g['export_s']:.2f} s (first call {g['first_s']:.2f} s); "
    line += f"max |prob diff| {g['prob_diff']:.2g}, max |logit diff| {g['logit_diff']:.2g}"
    if "quantize_s" in g:
        line += f"; int8 quantization {g['quantize_s']:.1f} s, int8 max |prob diff| {g['int8_prob_diff']:.2g}"
        line += f"; ORT batch 32: fp32 {g['fp32_b32']:.1f}, int8 {g['int8_b32']:.1f} img/s"
    return line


def _row(figure: str, measured: str, ratio: float, target: str = "-", met: bool | None = None) -> dict:
    return {"figure": figure, "measured": measured, "ratio": ratio, "target": target, "met": met}


def exporter_rows(*, repeats: int = 3) -> list[dict]:
    """The issue 20 figures: new exporter against old on a tiny ResNet and on ResNet-18 at 224 px."""
    rows = []
    quiet = logging.getLogger(onnx_format.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # opset 17 logs the deprecated exporter's notice on every call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model_name, size in (("test_resnet", 64), ("resnet18", 224)):
                f = compare_exporters(model_name, size, Path(tmp), repeats=repeats)
                label = f"{model_name}, {size} px"
                for name, g in f.items():
                    print(_describe(label, name, g))
                for new, old in (("onnx-dynamo", "onnx-legacy"), ("pt2", "torchscript")):
                    a, b = f[new], f[old]
                    time_ratio = a["export_s"] / b["export_s"]
                    rows.append(
                        _row(f"{new} / {old} export time ({label})", f"{a['export_s']:.2f} vs {b['export_s']:.2f} s", time_ratio)
                    )
                    rows.append(
                        _row(
                            f"{new} max |prob diff| to eager ({label})",
                            f"{a['prob_diff']:.2g} ({old}: {b['prob_diff']:.2g})",
                            a["prob_diff"],
                            f"<= {FP32_TOLERANCE:g}",
                            a["prob_diff"] <= FP32_TOLERANCE,
                        )
                    )
                a, b = f["onnx-dynamo"], f["onnx-legacy"]
                for kind in ("fp32", "int8"):
                    speeds = f"{a[f'{kind}_b32']:.1f} vs {b[f'{kind}_b32']:.1f} img/s"
                    rows.append(
                        _row(
                            f"ORT {kind}, dynamo / legacy graph ({label}, batch 32)", speeds, a[f"{kind}_b32"] / b[f"{kind}_b32"]
                        )
                    )
    finally:
        quiet.setLevel(level)
    return rows


def run(*, repeats: int = 5, accuracy: bool = True) -> list[dict]:
    rows = exporter_rows(repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in ("resnet18", "resnet50"):
            f = speed(model_name, Path(tmp), repeats=repeats)
            print(f"{model_name}: export {f['export_s']:.1f} s, int8 quantization {f['quantize_s']:.1f} s")
            for batch in (1, 32):
                eager, fp32, int8 = f[f"eager_b{batch}"], f[f"fp32_b{batch}"], f[f"int8_b{batch}"]
                print(f"  batch {batch}: eager {eager:.1f}, ORT fp32 {fp32:.1f}, ORT int8 {int8:.1f} img/s")
                rows += [
                    {
                        "figure": f"ORT fp32 / eager ({model_name}, 224 px, batch {batch})",
                        "measured": f"{fp32:.1f} vs {eager:.1f} img/s",
                        "ratio": fp32 / eager,
                        "target": ">= 1.3",
                        "met": fp32 / eager >= 1.3,
                    },
                    {
                        "figure": f"ORT int8 / eager ({model_name}, 224 px, batch {batch})",
                        "measured": f"{int8:.1f} vs {eager:.1f} img/s",
                        "ratio": int8 / eager,
                        "target": ">= 2",
                        "met": int8 / eager >= 2,
                    },
                ]
        if accuracy and DATA.is_dir():
            a = int8_accuracy(Path(tmp))
            print(
                f"hymenoptera last_stage (ResNet-18): int8 accuracy {a['accuracy_exported']:.4f} vs {a['accuracy_reference']:.4f}, "
                f"top-1 agreement {a['top1_agreement']:.2%}; export (onnx + int8 + parity) {a['export_s']:.1f} s"
            )
            rows.append(
                {
                    "figure": "int8 accuracy change on hymenoptera val (points)",
                    "measured": f"{a['accuracy_exported']:.4f} vs {a['accuracy_reference']:.4f}",
                    "ratio": 100 * a["accuracy_delta"],
                    "target": "within -1",
                    "met": a["accuracy_delta"] >= -0.01,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-accuracy", action="store_true", help="skip the hymenoptera training run")
    parser.add_argument("--exporters-only", action="store_true", help="only the new-against-old exporter comparison")
    args = parser.parse_args()
    rows = (
        exporter_rows(repeats=args.repeats) if args.exporters_only else run(repeats=args.repeats, accuracy=not args.no_accuracy)
    )
    for row in rows:
        print(f"{row['figure']}: {row['measured']} -> {row['ratio']:.3g} (target {row['target']})")


if __name__ == "__main__":
    main()
