"""Which precision and memory layout `train.amp: auto` and `train.channels_last: auto` should pick on this CPU.

One training step (SGD, every stage trainable, the batch already in memory) of ResNet-18 and ResNet-50 at 224 px in
four variants: fp32 NCHW (the plain default), channels_last, bf16 autocast, and both. Each repeat times every
variant back to back, rotating which goes first (this machine is shared: load moves between seconds), and each
ratio is the median of per-repeat ratios against that repeat's fp32 NCHW step.
Run: python benchmarks/bench_amp.py   (--models resnet18 resnet50 --batch 16 --repeats 5)
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn

from finetune.inference.device import native_bf16

VARIANTS = {
    "fp32": (False, None),
    "channels_last": (True, None),
    "bf16": (False, torch.bfloat16),
    "bf16 + channels_last": (True, torch.bfloat16),
}


class _Case:
    """One model in one variant, warmed up, ready to time."""

    def __init__(self, name: str, variant: str, batch: int, size: int) -> None:
        channels_last, self.dtype = VARIANTS[variant]
        torch.manual_seed(0)
        self.model = timm.create_model(name, num_classes=10).train()
        self.images, self.targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.step()

    def step(self) -> None:
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
            loss = nn.functional.cross_entropy(self.model(self.images).float(), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def seconds(self, steps: int) -> float:
        begun = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - begun) / steps


def measure(name: str, *, batch: int, size: int, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{variant: (median seconds per step, median speed against fp32 NCHW)}."""
    cases = {variant: _Case(name, variant, batch, size) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    ratios: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    order = list(VARIANTS)
    for repeat in range(repeats):
        turn = order[repeat % len(order) :] + order[: repeat % len(order)]
        seen = {variant: cases[variant].seconds(steps) for variant in turn}
        for variant, seconds in seen.items():
            times[variant].append(seconds)
            ratios[variant].append(seen["fp32"] / seconds)
    return {variant: (statistics.median(times[variant]), statistics.median(ratios[variant])) for variant in VARIANTS}


def run(
    *, models: tuple[str, ...] = ("resnet18", "resnet50"), batch: int = 16, size: int = 224, steps: int = 2, repeats: int = 5
) -> list[dict]:
    native = native_bf16()
    print(f"native bf16: {native or 'no (emulated)'}; {torch.get_num_threads()} threads; batch {batch}, {size} px")
    rows = []
    for name in models:
        found = measure(name, batch=batch, size=size, steps=steps, repeats=repeats)
        for variant, (seconds, speed) in found.items():
            print(f"  {name:9s} {variant:22s} {seconds:.3f} s/step  speed vs fp32 NCHW {speed:.2f}x")
        for variant in list(VARIANTS)[1:]:
            rows.append(
                {
                    "figure": f"{variant} step speed vs fp32 NCHW ({name}, {size} px, batch {batch})",
                    "measured": f"{found[variant][0]:.2f} vs {found['fp32'][0]:.2f} s/step",
                    "ratio": found[variant][1],
                    "target": "> 1 to adopt",
                    "met": None,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (the demo trains at 32)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(models=tuple(args.models), batch=args.batch, size=args.size, steps=args.steps, repeats=args.repeats)


if __name__ == "__main__":
    main()
