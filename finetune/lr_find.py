"""`finetune lr-find`: the exponential learning-rate range test (Smith 2017; fastai, Lightning Tuner)."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from finetune.data import ImageDataset, load_dataset_index, make_loader  # noqa: E402
from finetune.fit import build_criterion, build_optimizer, seed_everything  # noqa: E402
from finetune.freeze import FreezePlan, apply_freeze, set_train_mode  # noqa: E402
from finetune.inference import resolve_device  # noqa: E402
from finetune.model import build_model  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402
from finetune.transforms import build_train_pipeline, resolve_image_config  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    curve: pd.DataFrame  # lr, loss (raw), smoothed
    suggestion: float
    folder: Path


def lr_range_test(
    model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
    device: torch.device, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100, beta: float = 0.98,
    diverge: float = 4.0, progress: bool = True,
) -> pd.DataFrame:
    """Raise the LR exponentially each step and record the loss; model and optimizer are restored afterwards."""
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    base = [g["lr"] for g in optimizer.param_groups]
    top = max(base)
    rows, avg, best = [], 0.0, math.inf
    batches = iter(loader)
    try:
        for step in tqdm(range(steps), desc="lr-find", disable=not progress, leave=False):
            lr = start_lr * (end_lr / start_lr) ** (step / max(steps - 1, 1))
            for group, group_base in zip(optimizer.param_groups, base):
                group["lr"] = lr * group_base / top  # keep per-stage ratios (layer decay, lr_mult)
            try:
                images, targets = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, targets = next(batches)
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
    return pd.DataFrame(rows)


def suggest_lr(curve: pd.DataFrame) -> float:
    """The LR of steepest descent of the smoothed loss, before its minimum (skipping the noisy start)."""
    upto = int(curve["smoothed"].idxmin()) + 1
    part = curve.iloc[: max(upto, 3)]
    skip = min(len(part) // 10, 5)
    part = part.iloc[skip:]
    if len(part) < 3:
        return float(curve["lr"].iloc[max(upto - 1, 0)] / 10)
    slope = np.gradient(part["smoothed"].to_numpy(), np.log10(part["lr"].to_numpy()))
    return float(part["lr"].iloc[int(np.argmin(slope))])


def plot_curve(curve: pd.DataFrame, suggestion: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(curve["lr"], curve["loss"], color="0.75", lw=1, label="loss")
    ax.plot(curve["lr"], curve["smoothed"], color="C0", lw=2, label="smoothed")
    ax.axvline(suggestion, color="C3", ls="--", label=f"suggested lr {suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (first phase, head group)")
    ax.set_ylabel("training loss")
    low, high = curve["smoothed"].min(), curve["smoothed"].iloc[0]
    ax.set_ylim(low - 0.1 * abs(high - low), high + 0.5 * abs(high - low) + 1e-6)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def find_lr(*, recipe: str | Path, data: str | Path | None, out: str | Path, overrides: Sequence[str] = (), steps: int = 100,
            start_lr: float = 1e-7, end_lr: float = 10.0, progress: bool = True) -> LRFindResult:
    """Range test for the recipe's first phase on its training split; writes lr_find.csv and lr_find.png into `out`."""
    loaded = load_recipe(recipe, overrides=list(overrides))
    if data is not None:
        loaded = loaded.model_copy(update={"data": loaded.data.model_copy(update={"path": Path(data)})})
    index = load_dataset_index(loaded.data, seed=loaded.seed)
    seed_everything(loaded.seed)
    bundle = build_model(loaded.model, num_classes=len(index.class_names))
    image = resolve_image_config(loaded.transforms, bundle.data_config)
    rows = index.split("train")
    dataset = ImageDataset(rows["path"], index.targets(rows), build_train_pipeline(loaded.transforms, image, seed=loaded.seed))
    loader = make_loader(dataset, batch_size=loaded.data.batch_size, num_workers=loaded.data.num_workers, shuffle=True, seed=loaded.seed)
    phase = loaded.train.resolved_phases()[0]
    plan = FreezePlan(trainable=phase.trainable(), bn=phase.bn)
    apply_freeze(bundle.model, plan, classifier=bundle.classifier)
    device = resolve_device(loaded.train.device)
    model = bundle.model.to(device)
    set_train_mode(model, plan, classifier=bundle.classifier)
    optimizer = build_optimizer(model, phase, loaded.train, classifier=bundle.classifier)
    curve = lr_range_test(model, loader, optimizer, build_criterion(loaded.loss).to(device), device=device,
                          start_lr=start_lr, end_lr=end_lr, steps=steps, progress=progress)
    suggestion = suggest_lr(curve)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curve.to_csv(out / "lr_find.csv", index=False, float_format="%.6g")
    plot_curve(curve, suggestion, out / "lr_find.png")
    log.info("lr-find: %d steps, suggested lr %.3g (the recipe's first phase has %.3g)", len(curve), suggestion, phase.lr)
    return LRFindResult(curve=curve, suggestion=suggestion, folder=out)
