"""finetune's training and inference loops against a bare PyTorch loop, measured in the same process.

Same timm model, batch, input size, optimizer and in-memory data for both. Each repeat times the two
loops back to back (alternating which goes first); the ratio is the median of the per-repeat ratios. Run: python benchmarks/bench_loops.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn

from finetune.config.schema import PhaseConfig, TrainConfig
from finetune.inference.forward import run_inference
from finetune.models.stages import FreezePlan, StageMap, apply_freeze, set_train_mode
from finetune.training.epoch import Stepper, train_one_epoch
from finetune.training.optim import build_optimizer, build_scheduler


def _batches(size: int, batch: int, steps: int, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, classes, (batch,), generator=generator))
        for _ in range(steps)
    ]


def bare_train(model: nn.Module, batches, lr: float = 1e-3) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for images, targets in batches:
        loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def finetune_train(model: nn.Module, batches) -> float:
    phase = PhaseConfig(epochs=1, lr=1e-3)
    cfg = TrainConfig(weight_decay=0.0)
    stages = StageMap.of(model, "fc")
    plan = FreezePlan(trainable=phase.trainable_stages())
    apply_freeze(model, plan, stages)
    optimizer = build_optimizer(model, phase, cfg, stages)
    schedule = build_scheduler(optimizer, cfg, total_steps=len(batches), steps_per_epoch=len(batches))
    set_train_mode(model, plan, stages)
    stepper = Stepper(criterion=nn.CrossEntropyLoss(), optimizer=optimizer, schedule=schedule, device=torch.device("cpu"))
    start = time.perf_counter()
    train_one_epoch(model, batches, stepper, epoch=1, progress=False)
    return time.perf_counter() - start


@torch.inference_mode()
def bare_eval(model: nn.Module, batches) -> float:
    model.eval()
    start = time.perf_counter()
    for images, _ in batches:
        model(images).softmax(dim=1)
    return time.perf_counter() - start


def finetune_eval(model: nn.Module, batches) -> float:
    start = time.perf_counter()
    run_inference(model, batches, device=torch.device("cpu"), paths=[""] * sum(len(t) for _, t in batches), progress=False)
    return time.perf_counter() - start


LOOPS = {"train": (bare_train, finetune_train), "eval": (bare_eval, finetune_eval)}


def measure(size: int, batch: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    batches = _batches(size, batch, steps)
    images = batch * steps
    bare_train(model, batches[:2])  # warm-up: allocator and kernels
    rows = {"bare_train": [], "finetune_train": [], "bare_eval": [], "finetune_eval": []}
    for repeat in range(repeats):  # each repeat times both loops back to back, alternating which goes first
        for kind in ("train", "eval"):
            pair = [("bare", LOOPS[kind][0]), ("finetune", LOOPS[kind][1])]
            for name, loop in pair if repeat % 2 == 0 else pair[::-1]:
                rows[f"{name}_{kind}"].append(images / loop(model, batches))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    paired = {
        kind: statistics.median(f / b for f, b in zip(rows[f"finetune_{kind}"], rows[f"bare_{kind}"]))
        for kind in ("train", "eval")
    }
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        **{f"{k}_img_s": round(v, 1) for k, v in medians.items()},
        "train_ratio": round(paired["train"], 3),  # median of per-repeat ratios: slow drifts of the machine cancel
        "eval_ratio": round(paired["eval"], 3),
    }


def run(*, repeats: int = 5) -> list[dict]:
    results = [measure(64, 32, 12, repeats), measure(224, 32, 4, repeats)]
    rows = []
    for r in results:
        print(
            f"ResNet-18 {r['size']} px, batch {r['batch']}: train {r['finetune_train_img_s']} vs bare {r['bare_train_img_s']} img/s "
            f"-> ratio {r['train_ratio']} (target >= 0.97); eval {r['finetune_eval_img_s']} vs bare {r['bare_eval_img_s']} img/s "
            f"-> ratio {r['eval_ratio']} (target >= 0.95)"
        )
        rows += [
            {
                "figure": f"training throughput, finetune / bare loop (ResNet-18, {r['size']} px)",
                "measured": f"{r['finetune_train_img_s']} vs {r['bare_train_img_s']} img/s",
                "ratio": r["train_ratio"],
                "target": ">= 0.97",
                "met": r["train_ratio"] >= 0.97,
            },
            {
                "figure": f"eval throughput, finetune / bare inference_mode ({r['size']} px)",
                "measured": f"{r['finetune_eval_img_s']} vs {r['bare_eval_img_s']} img/s",
                "ratio": r["eval_ratio"],
                "target": ">= 0.95",
                "met": r["eval_ratio"] >= 0.95,
            },
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(repeats=args.repeats)


if __name__ == "__main__":
    main()
