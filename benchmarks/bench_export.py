"""Exported models against PyTorch eager inference, in one process: onnxruntime fp32 and int8, ResNet-18 and ResNet-50
at 224 px, batch 1 and 32 (the same uint8 input to all three, medians over repeats), the export's own wall time, and
the int8 model's accuracy change on a hymenoptera run.

Targets (issue 12): ORT fp32 >= 1.3x eager, int8 >= 2x, int8 accuracy within 1 point.
Run: python benchmarks/bench_export.py   (needs ../shared/datasets/hymenoptera for the accuracy figure)
"""

from __future__ import annotations

import argparse
import json
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
from finetune.deploy import onnx_format
from finetune.deploy.package import PackagedClassifier

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


def run(*, repeats: int = 5, accuracy: bool = True) -> list[dict]:
    rows = []
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
    args = parser.parse_args()
    for row in run(repeats=args.repeats, accuracy=not args.no_accuracy):
        print(f"{row['figure']}: {row['measured']} -> {row['ratio']:.3g} (target {row['target']})")


if __name__ == "__main__":
    main()
