"""What the peers' levers cost per step: weight EMA and mixup/cutmix against the same training loop without them,
and hflip test-time augmentation against single-view inference, measured in the same process.

Same timm ResNet-18, in-memory batches and optimizer for both sides of each pair; each repeat times the two
back to back (alternating which goes first) and the ratio is the median of per-repeat ratios.
Run: python benchmarks/bench_levers.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from finetune.config.schema import EmaConfig, MixupConfig, PhaseConfig, TrainConfig
from finetune.inference.forward import run_inference, run_tta
from finetune.models.stages import FreezePlan, StageMap, apply_freeze, set_train_mode
from finetune.training.ema import StageEma, moving_tensors
from finetune.training.epoch import Stepper, train_one_epoch
from finetune.training.mixup import Mixer, soft_target_criterion
from finetune.training.optim import build_optimizer, build_scheduler

CPU = torch.device("cpu")


def _batches(size: int, batch: int, steps: int, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, classes, (batch,), generator=generator))
        for _ in range(steps)
    ]


def _trainer(model: nn.Module, trainable: tuple[str, ...], *, ema: bool = False, mixup: bool = False) -> Callable[[list], float]:
    phase = PhaseConfig(epochs=1, lr=1e-3, trainable=list(trainable))
    cfg = TrainConfig(weight_decay=0.0)
    stages = StageMap.of(model, "fc")
    plan = FreezePlan(trainable=phase.trainable_stages())
    apply_freeze(model, plan, stages)
    average = StageEma(model, EmaConfig()) if ema else None
    if average is not None:
        average.start_phase(model, moving_tensors(model, plan, stages))
    mixer = Mixer(MixupConfig(), label_smoothing=0.1, num_classes=10) if mixup else None

    def run(batches: list) -> float:
        optimizer = build_optimizer(model, phase, cfg, stages)
        schedule = build_scheduler(optimizer, cfg, total_steps=len(batches), steps_per_epoch=len(batches))
        set_train_mode(model, plan, stages)
        stepper = Stepper(
            criterion=nn.CrossEntropyLoss(),
            optimizer=optimizer,
            schedule=schedule,
            device=CPU,
            ema=average,
            mix=mixer,
            mixed_criterion=soft_target_criterion(None) if mixer else None,
        )
        start = time.perf_counter()
        train_one_epoch(model, batches, stepper, epoch=1, progress=False)
        return time.perf_counter() - start

    return run


def _pairs(model: nn.Module, batches: list, repeats: int, base: Callable, other: Callable) -> tuple[float, float, float]:
    """(base img/s, other img/s, median of per-repeat other/base throughput ratios)."""
    images = sum(len(t) for _, t in batches)
    base(batches[:1]), other(batches[:1])  # warm-up
    a, b = [], []
    for repeat in range(repeats):
        order = [(a, base), (b, other)] if repeat % 2 == 0 else [(b, other), (a, base)]
        for sink, loop in order:
            sink.append(images / loop(batches))
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def _eval_pair(model: nn.Module, batches: list) -> tuple[Callable, Callable]:
    paths = [""] * sum(len(t) for _, t in batches)

    def single(chunk: list) -> float:
        start = time.perf_counter()
        run_inference(model, chunk, device=CPU, paths=paths[: sum(len(t) for _, t in chunk)], progress=False)
        return time.perf_counter() - start

    def flipped(chunk: list) -> float:
        start = time.perf_counter()
        run_tta(
            model,
            chunk,
            names=["hflip"],
            device=CPU,
            paths=paths[: sum(len(t) for _, t in chunk)],
            temperature=1.0,
            progress=False,
        )
        return time.perf_counter() - start

    return single, flipped


def run(*, repeats: int = 5, size: int = 64, batch: int = 32, steps: int = 8) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    batches = _batches(size, batch, steps)
    rows = []
    cases = [
        ("EMA, every stage trains", ("stem", "layer1", "layer2", "layer3", "layer4", "head"), {"ema": True}, 0.95),
        ("EMA, layer4 + head train", ("layer4", "head"), {"ema": True}, 0.95),
        ("mixup/cutmix, every stage trains", ("stem", "layer1", "layer2", "layer3", "layer4", "head"), {"mixup": True}, 0.95),
    ]
    for name, trainable, lever, target in cases:
        base, other, ratio = _pairs(model, batches, repeats, _trainer(model, trainable), _trainer(model, trainable, **lever))
        print(
            f"{name} ({size} px, batch {batch}): {other:.1f} vs {base:.1f} img/s without -> ratio {ratio:.3f} (target >= {target})"
        )
        rows.append(
            {
                "figure": f"training throughput with {name} / without (ResNet-18, {size} px)",
                "measured": f"{other:.1f} vs {base:.1f} img/s",
                "ratio": ratio,
                "target": f">= {target}",
                "met": ratio >= target,
            }
        )
    base, other, ratio = _pairs(model, batches, repeats, *_eval_pair(model, batches))
    print(f"hflip TTA inference: {other:.1f} vs {base:.1f} img/s single view -> ratio {ratio:.3f} (2 views: expect ~0.5)")
    rows.append(
        {
            "figure": f"inference throughput with hflip TTA / single view (ResNet-18, {size} px)",
            "measured": f"{other:.1f} vs {base:.1f} img/s",
            "ratio": ratio,
            "target": ">= 0.45 (two forward passes)",
            "met": ratio >= 0.45,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(repeats=args.repeats)


if __name__ == "__main__":
    main()
