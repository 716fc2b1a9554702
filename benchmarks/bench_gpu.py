"""GPU throughput per backbone family, and what bf16 + channels_last buy on the card, in the same process.

Needs CUDA (run it on a GPU machine: `python benchmarks/bench_gpu.py`). 224 px, random weights, 10 classes, batches
already on the card (the loop's compute, not the loader). For each model: finetune's training step
(`train_one_epoch`, every stage trainable) and its forward loop (`collect_logits`), in fp32 and in bf16 autocast with
channels_last (what `train.amp: bf16` + `train.channels_last: true` set); each repeat measures every model and mode
once, and a ratio is the median of per-repeat ratios. `--json FILE` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from finetune.config.schema import ModelConfig, PhaseConfig, TrainConfig
from finetune.inference.forward import collect_logits
from finetune.models.build import ModelBundle, build_model
from finetune.models.families import family_of
from finetune.models.stages import FreezePlan, apply_freeze, set_train_mode
from finetune.training.epoch import Stepper, train_one_epoch
from finetune.training.optim import build_optimizer, build_scheduler

MODELS = ("resnet50", "resnet18", "convnext_tiny", "efficientnet_b0", "regnety_016", "vit_small_patch16_224")
MODES = {"fp32": (None, False), "bf16+channels_last": (torch.bfloat16, True)}


def _batches(*, size: int, batch: int, steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch, 3, size, size, generator=generator).to(device),
            torch.randint(0, 10, (batch,), generator=generator),  # targets stay on the host, as a loader gives them
        )
        for _ in range(steps)
    ]


def _stepper(bundle: ModelBundle, steps: int, *, device: torch.device, dtype: torch.dtype | None, nhwc: bool) -> Stepper:
    phase = PhaseConfig(epochs=1, lr=1e-3, trainable="all")
    cfg = TrainConfig(weight_decay=0.0)
    plan = FreezePlan(trainable=phase.trainable_stages())
    apply_freeze(bundle.model, plan, bundle.stages)
    optimizer = build_optimizer(bundle.model, phase, cfg, bundle.stages)
    schedule = build_scheduler(optimizer, cfg, total_steps=steps, steps_per_epoch=steps)
    set_train_mode(bundle.model, plan, bundle.stages)
    return Stepper(
        criterion=nn.CrossEntropyLoss(), optimizer=optimizer, schedule=schedule, device=device, dtype=dtype, channels_last=nhwc
    )


def _timed(work) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@contextlib.contextmanager
def _mode(bundle: ModelBundle, nhwc: bool) -> Iterator[None]:
    bundle.model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    yield
    bundle.model.to(memory_format=torch.contiguous_format)


def speeds(bundle: ModelBundle, batches, *, device: torch.device, dtype: torch.dtype | None, nhwc: bool) -> tuple[float, float]:
    """(train img/s, inference img/s) of one model in one precision mode."""
    images = sum(len(t) for _, t in batches)
    with _mode(bundle, nhwc):
        stepper = _stepper(bundle, len(batches), device=device, dtype=dtype, nhwc=nhwc)
        train = _timed(lambda: train_one_epoch(bundle.model, batches, stepper, epoch=1, progress=False))
        layout = torch.channels_last if nhwc else torch.contiguous_format
        views = [(x.contiguous(memory_format=layout), t) for x, t in batches]
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            infer = _timed(lambda: collect_logits(bundle.model, views, device=device, progress=False))
    return images / train, images / infer


def measure(*, batch: int, steps: int, repeats: int) -> list[dict]:
    device = torch.device("cuda")
    batches = _batches(size=224, batch=batch, steps=steps, device=device)
    bundles = {name: build_model(ModelConfig(name=name), num_classes=10, load_pretrained=False) for name in MODELS}
    for bundle in bundles.values():
        bundle.model.to(device)
        for dtype, nhwc in MODES.values():  # warm-up: cuDNN autotuning, allocator, kernels
            speeds(bundle, batches[:2], device=device, dtype=dtype, nhwc=nhwc)
    got: dict[tuple[str, str], list[tuple[float, float]]] = {(m, k): [] for m in MODELS for k in MODES}
    for _ in range(repeats):
        for name, bundle in bundles.items():
            for mode, (dtype, nhwc) in MODES.items():
                got[name, mode].append(speeds(bundle, batches, device=device, dtype=dtype, nhwc=nhwc))
    rows = []
    for name in MODELS:
        fp32, fast = got[name, "fp32"], got[name, "bf16+channels_last"]
        rows.append(
            {
                "model": name,
                "family": family_of(name).name,
                "train_fp32": statistics.median(s[0] for s in fp32),
                "train_bf16": statistics.median(s[0] for s in fast),
                "train_ratio": statistics.median(f[0] / s[0] for f, s in zip(fast, fp32)),
                "infer_fp32": statistics.median(s[1] for s in fp32),
                "infer_bf16": statistics.median(s[1] for s in fast),
                "infer_ratio": statistics.median(f[1] / s[1] for f, s in zip(fast, fp32)),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | family | train img/s fp32 | train img/s bf16+CL (x) | inference img/s fp32 | inference img/s bf16+CL (x) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['family']} | {r['train_fp32']:.0f} | {r['train_bf16']:.0f} ({r['train_ratio']:.2f}x) | "
            f"{r['infer_fp32']:.0f} | {r['infer_bf16']:.0f} ({r['infer_ratio']:.2f}x) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device; run it on a GPU machine")
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    rows = measure(batch=args.batch, steps=args.steps, repeats=args.repeats)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, {args.steps} steps, {args.repeats} repeats"
    )
    print(markdown(rows))
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
