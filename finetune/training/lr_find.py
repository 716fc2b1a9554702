"""The exponential learning-rate range test (Smith 2017; fastai, Lightning Tuner) and its suggestion."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

SKIP_START = 10  # as Lightning's Tuner: the steepest descent is looked for after the first 10 points


def _cycle(batches: Iterable[Any]) -> Any:
    while True:
        yielded = False
        for batch in batches:
            yielded = True
            yield batch
        if not yielded:
            return


def lr_range_test(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    device: torch.device,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Raise the LR exponentially each step and record the loss; model and optimizer are restored afterwards.

    Stops early when the smoothed loss exceeds `diverge` times its minimum. Per-group LR ratios
    (timm's `lr_scale`: layer decay, lr_mult) are kept.
    """
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    top = max(scales)
    rows, avg, best = [], 0.0, math.inf
    stream = _cycle(batches)
    try:
        for step in tqdm(range(steps), desc="lr-find", disable=not progress, leave=False):
            lr = start_lr * (end_lr / start_lr) ** (step / max(steps - 1, 1))
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale / top
            images, targets = next(stream)
            loss = criterion(model(images.to(device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            avg = beta * avg + (1 - beta) * value
            smoothed = avg / (1 - beta ** (step + 1))
            rows.append({"lr": lr, "loss": value, "smoothed": smoothed})
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
    return pd.DataFrame(rows, columns=["lr", "loss", "smoothed"])


def suggest_lr(curve: pd.DataFrame) -> float:
    """The LR of steepest descent of the smoothed loss, before its minimum (skipping the noisy start)."""
    upto = int(curve["smoothed"].idxmin()) + 1
    part = curve.iloc[: max(upto, 3)]
    part = part.iloc[min(SKIP_START, len(part) // 3) :]  # the first points average few batches: noise, not slope
    if len(part) < 3:
        return float(max(curve["lr"].iloc[max(upto - 1, 0)] / 10, curve["lr"].iloc[0]))
    slope = np.gradient(part["smoothed"].to_numpy(), np.log10(part["lr"].to_numpy()))
    return float(part["lr"].iloc[int(np.argmin(slope))])


MIN_POINTS = 20  # fewer points than this and the smoothed curve is mostly the smoothing's warm-up


def unreliable(curve: pd.DataFrame) -> str | None:
    """Why the suggestion should not be trusted (too short a curve, no real descent, one dip), or None."""
    if len(curve) < MIN_POINTS:
        return f"only {len(curve)} steps were recorded; run it with --steps 100 (or more) before trusting the suggestion"
    smoothed = curve["smoothed"].to_numpy()
    start, low = float(smoothed[0]), float(smoothed.min())
    descent = start - low
    if descent < 0.05 * abs(start):
        return "the loss hardly falls anywhere on the curve; the suggestion is a guess (check the data, or widen the LR range)"
    near_low = int((smoothed <= low + 0.1 * descent).sum())
    if near_low <= 2:
        return "the loss reaches its low in a single dip, likely noise; run with more --steps or a larger batch"
    return None
