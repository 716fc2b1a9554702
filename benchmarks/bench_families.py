"""Training and inference throughput of each backbone family's smallest model against ResNet-50, in the same process.

224 px, fp32 (the CPU default: `amp: auto` is fp32 on CPU), random weights (speed does not depend on them), 10 classes.
Training is finetune's own step (`train_one_epoch`) with every stage trainable, and the last_stage phase
(layer4 + head train, the rest frozen, no cache); inference is finetune's forward loop (`run_inference`). Each repeat
measures every model once (the order rotating), and a model's ratio to ResNet-50 is the median of its per-repeat
ratios, so slow drifts of a shared machine cancel. Run: python benchmarks/bench_families.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from finetune.config.schema import ModelConfig, PhaseConfig, TrainConfig
from finetune.inference.forward import run_inference
from finetune.models.build import ModelBundle, build_model
from finetune.models.families import family_of
from finetune.models.stages import FreezePlan, apply_freeze, set_train_mode
from finetune.training.epoch import Stepper, train_one_epoch
from finetune.training.optim import build_optimizer, build_scheduler

BASELINE = "resnet50"
MODELS = (
    BASELINE,
    "resnet18",
    "convnext_atto",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "regnety_002",
    "deit_tiny_patch16_224",
)
LAST_STAGE = ("layer4", "head")


def _batches(size: int, batch: int, steps: int, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, classes, (batch,), generator=generator))
        for _ in range(steps)
    ]


def train_seconds(bundle: ModelBundle, batches, trainable: tuple[str, ...] | str) -> float:
    """One epoch of finetune's training step over `batches` with `trainable` stages (frozen BatchNorm elsewhere)."""
    phase = PhaseConfig(epochs=1, lr=1e-3, trainable=trainable)
    cfg = TrainConfig(weight_decay=0.0)
    plan = FreezePlan(trainable=phase.trainable_stages())
    apply_freeze(bundle.model, plan, bundle.stages)
    optimizer = build_optimizer(bundle.model, phase, cfg, bundle.stages)
    schedule = build_scheduler(optimizer, cfg, total_steps=len(batches), steps_per_epoch=len(batches))
    set_train_mode(bundle.model, plan, bundle.stages)
    stepper = Stepper(criterion=nn.CrossEntropyLoss(), optimizer=optimizer, schedule=schedule, device=torch.device("cpu"))
    start = time.perf_counter()
    train_one_epoch(bundle.model, batches, stepper, epoch=1, progress=False)
    return time.perf_counter() - start


def eval_seconds(bundle: ModelBundle, batches) -> float:
    start = time.perf_counter()
    paths = [""] * sum(len(t) for _, t in batches)
    run_inference(bundle.model.eval(), batches, device=torch.device("cpu"), paths=paths, progress=False)
    return time.perf_counter() - start


def measure(*, size: int, batch: int, train_steps: int, eval_steps: int, repeats: int) -> dict[str, dict[str, float]]:
    """img/s per model and kind (train, last_stage, eval) and the median per-repeat ratio to ResNet-50."""
    bundles = {name: build_model(ModelConfig(name=name), num_classes=10, load_pretrained=False) for name in MODELS}
    train_batches, eval_batches = _batches(size, batch, train_steps), _batches(size, batch, eval_steps)
    kinds = {
        "train": lambda b: batch * train_steps / train_seconds(b, train_batches, "all"),
        "last_stage": lambda b: batch * train_steps / train_seconds(b, train_batches, list(LAST_STAGE)),
        "eval": lambda b: batch * eval_steps / eval_seconds(b, eval_batches),
    }
    for bundle in bundles.values():  # warm-up: allocator, kernels, first-call overheads
        train_seconds(bundle, train_batches[:1], "all")
        eval_seconds(bundle, eval_batches[:1])
    speeds: dict[str, dict[str, list[float]]] = {name: {k: [] for k in kinds} for name in MODELS}
    for repeat in range(repeats):
        order = MODELS[repeat % len(MODELS) :] + MODELS[: repeat % len(MODELS)]
        for name in order:
            for kind, speed in kinds.items():
                speeds[name][kind].append(speed(bundles[name]))
    results: dict[str, dict[str, float]] = {}
    for name in MODELS:
        row: dict[str, float] = {}
        for kind in kinds:
            row[f"{kind}_img_s"] = statistics.median(speeds[name][kind])
            ratios = [s / b for s, b in zip(speeds[name][kind], speeds[BASELINE][kind])]
            row[f"{kind}_vs_resnet50"] = statistics.median(ratios)
        row["params_m"] = sum(p.numel() for p in bundles[name].model.parameters()) / 1e6
        results[name] = row
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| model | family | params | train img/s (vs ResNet-50) | last_stage img/s (vs ResNet-50) | inference img/s (vs ResNet-50) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        cells = [f"{r[f'{k}_img_s']:.1f} ({r[f'{k}_vs_resnet50']:.2f}x)" for k in ("train", "last_stage", "eval")]
        lines.append(f"| {name} | {family_of(name).name} | {r['params_m']:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(*, repeats: int = 3) -> list[dict]:
    started = time.perf_counter()
    results = measure(size=224, batch=8, train_steps=2, eval_steps=4, repeats=repeats)
    print(markdown(results))
    print(f"({repeats} repeats, {torch.get_num_threads()} torch threads, {time.perf_counter() - started:.0f} s)")
    return [
        {
            "figure": f"training / inference throughput, {name} vs ResNet-50 (224 px, fp32)",
            "measured": f"{r['train_img_s']:.1f} / {r['eval_img_s']:.1f} img/s",
            "ratio": r["train_vs_resnet50"],
            "target": "(measured)",
            "met": None,
        }
        for name, r in results.items()
        if name != BASELINE
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run(repeats=args.repeats)


if __name__ == "__main__":
    main()
