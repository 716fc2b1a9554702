"""finetune's training and inference loops against a bare PyTorch loop, measured in the same process.

Same timm model, batch, input size, optimizer and in-memory data for both; medians over repeats,
alternating the two loops so that machine noise hits both alike. Run: python benchmarks/bench_loops.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn

from finetune.fit import _train_epoch, build_optimizer, build_scheduler
from finetune.freeze import FreezePlan, apply_freeze, set_train_mode
from finetune.inference import run_inference
from finetune.recipe import PhaseConfig, TrainConfig


def _batches(size: int, batch: int, steps: int, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, classes, (batch,), generator=generator)) for _ in range(steps)]


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
    plan = FreezePlan(trainable=phase.trainable())
    apply_freeze(model, plan, classifier="fc")
    optimizer = build_optimizer(model, phase, cfg, classifier="fc")
    scheduler = build_scheduler(optimizer, cfg, total_steps=len(batches), steps_per_epoch=len(batches))
    set_train_mode(model, plan, classifier="fc")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    start = time.perf_counter()
    _train_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), device=torch.device("cpu"), dtype=None,
                 scaler=scaler, grad_clip=None, progress=False, desc="bench", epoch=1)
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


def measure(size: int, batch: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    batches = _batches(size, batch, steps)
    images = batch * steps
    bare_train(model, batches[:2])  # warm-up: allocator and kernels
    rows = {"bare_train": [], "finetune_train": [], "bare_eval": [], "finetune_eval": []}
    for _ in range(repeats):
        rows["bare_train"].append(images / bare_train(model, batches))
        rows["finetune_train"].append(images / finetune_train(model, batches))
        rows["bare_eval"].append(images / bare_eval(model, batches))
        rows["finetune_eval"].append(images / finetune_eval(model, batches))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "size": size, "batch": batch, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
        **{f"{k}_img_s": round(v, 1) for k, v in medians.items()},
        "train_ratio": round(medians["finetune_train"] / medians["bare_train"], 3),
        "eval_ratio": round(medians["finetune_eval"] / medians["bare_eval"], 3),
    }


def run(*, repeats: int = 5) -> list[dict]:
    results = [measure(64, 32, 12, repeats), measure(224, 32, 4, repeats)]
    rows = []
    for r in results:
        print(f"ResNet-18 {r['size']} px, batch {r['batch']}: train {r['finetune_train_img_s']} vs bare {r['bare_train_img_s']} img/s "
              f"-> ratio {r['train_ratio']} (target >= 0.97); eval {r['finetune_eval_img_s']} vs bare {r['bare_eval_img_s']} img/s "
              f"-> ratio {r['eval_ratio']} (target >= 0.95)")
        rows += [
            {"figure": f"training throughput, finetune / bare loop (ResNet-18, {r['size']} px)",
             "measured": f"{r['finetune_train_img_s']} vs {r['bare_train_img_s']} img/s", "ratio": r["train_ratio"], "target": ">= 0.97",
             "met": r["train_ratio"] >= 0.97},
            {"figure": f"eval throughput, finetune / bare inference_mode ({r['size']} px)",
             "measured": f"{r['finetune_eval_img_s']} vs {r['bare_eval_img_s']} img/s", "ratio": r["eval_ratio"], "target": ">= 0.95",
             "met": r["eval_ratio"] >= 0.95},
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(repeats=args.repeats)


if __name__ == "__main__":
    main()
