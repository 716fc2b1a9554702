"""Achieved FLOP/s of a ResNet-18 (or `--model resnet50`) training step at 224 px as a fraction of this CPU's fp32 matmul peak.

The peak is measured here (torch.mm of 2048x2048 fp32 matrices, median GFLOP/s). The step's FLOPs
(forward + backward) are counted once with torch.utils.flop_counter. Variants: NCHW fp32 (finetune's
default), channels_last, bf16 autocast, and both; the fastest is what finetune should use.
Run: python benchmarks/bench_flops.py   (or --model resnet50)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

VARIANTS = {
    "fp32": (False, None),
    "channels_last": (True, None),
    "bf16 autocast": (False, torch.bfloat16),
    "channels_last + bf16": (True, torch.bfloat16),
}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them PyTorch emulates bf16 on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _step(model, optimizer, images, targets, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = nn.functional.cross_entropy(model(images).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_flops(batch: int, size: int, name: str = "resnet18") -> int:
    model = timm.create_model(name, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with FlopCounterMode(display=False) as counter:
        _step(model, optimizer, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)), None)
    return counter.get_total_flops()


def step_seconds(variant: str, batch: int, size: int, steps: int, repeats: int, name: str = "resnet18") -> float:
    channels_last, dtype = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    _step(model, optimizer, images, targets, dtype)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            _step(model, optimizer, images, targets, dtype)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def run(*, batch: int = 16, size: int = 224, steps: int = 2, repeats: int = 3, name: str = "resnet18") -> list[dict]:
    peak = matmul_peak()
    flops = step_flops(batch, size, name)
    print(
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads); "
        f"{name} training step, batch {batch}, {size} px: {flops / 1e9:.1f} GFLOP"
    )
    seconds = {}
    for variant in VARIANTS:
        slow = VARIANTS[variant][1] is not None and not cpu_has_native_bf16()  # emulated bf16: ~15x slower, one step says enough
        seconds[variant] = step_seconds(variant, batch, size, 1 if slow else steps, 1 if slow else repeats, name)
        rate = flops / seconds[variant]
        print(
            f"  {variant:22s} {seconds[variant]:.3f} s/step  {rate / 1e9:6.1f} GFLOP/s  {rate / peak:.1%} of peak  "
            f"speed vs fp32 {seconds['fp32'] / seconds[variant]:.2f}x"
        )
    best = min(seconds, key=seconds.get)
    rows = [
        {
            "figure": f"training step FLOP/s / fp32 matmul peak ({name}, {size} px, fp32 NCHW)",
            "measured": f"{flops / seconds['fp32'] / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s",
            "ratio": flops / seconds["fp32"] / peak,
            "target": "(bare loop ~0.34)",
            "met": None,
        }
    ]
    for variant in list(VARIANTS)[1:]:
        rows.append(
            {
                "figure": f"{variant} step speed vs fp32 NCHW ({name})",
                "measured": f"{seconds[variant]:.2f} vs {seconds['fp32']:.2f} s/step",
                "ratio": seconds["fp32"] / seconds[variant],
                "target": "> 1 to adopt",
                "met": None,
            }
        )
    print(f"fastest: {best}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="resnet18", help="a timm model name (resnet18, resnet50)")
    args = parser.parse_args()
    run(batch=args.batch, repeats=args.repeats, name=args.model)


if __name__ == "__main__":
    main()
