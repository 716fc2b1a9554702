"""The forward pass of a trained model over batches, with test-time views: the one loop that turns images into logits.

Validation during training, eval, predict, explain and export parity all run it. Test-time views are combined in
the recipe's order: `[hflip]` is 2 views (as is, mirrored), `[hflip, vflip]` 4, `five_crop` replaces each view by
its four corner and centre crops (87.5% of the side, resized back), so `[hflip, five_crop]` is 10. The temperature
fitted on single-view validation logits is applied to every view before the probabilities are averaged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from finetune.bars import progress as progress_bar
from finetune.inference.predictions import Predictions
from finetune.inference.task import SingleLabel, Task


@torch.inference_mode()
def collect_logits(
    model: nn.Module, batches: Iterable[Any], *, device: torch.device, progress: bool = True, desc: str = "predict"
) -> tuple[np.ndarray, np.ndarray]:
    """(N x C float32 logits, N targets) for every batch of (images, targets), in order; the model is put in eval mode."""
    model.eval()
    logits, targets = [], []
    for images, labels in progress_bar(batches, desc=desc, disable=not progress, leave=False):
        logits.append(model(images.to(device, non_blocking=True)).float().cpu().numpy())
        targets.append(np.asarray(labels, dtype=np.int64))
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits), np.concatenate(targets)


View = Callable[[torch.Tensor], torch.Tensor]
CROP_SHARE = 0.875


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _crop(top: float, left: float) -> View:
    """The crop of CROP_SHARE of each side at (top, left) in [0, 1] of the free room, resized to the input size."""

    def view(x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h, w = round(height * CROP_SHARE), round(width * CROP_SHARE)
        y, z = round((height - h) * top), round((width - w) * left)
        return F.interpolate(x[..., y : y + h, z : z + w], size=(height, width), mode="bilinear", align_corners=False)

    return view


def _options(name: str) -> list[View]:
    if name == "hflip":
        return [_identity, lambda x: x.flip(-1)]
    if name == "vflip":
        return [_identity, lambda x: x.flip(-2)]
    if name == "five_crop":
        return [_crop(0, 0), _crop(0, 1), _crop(1, 0), _crop(1, 1), _crop(0.5, 0.5)]
    raise ValueError(f"unknown test-time view '{name}'; use hflip, vflip or five_crop")


def _compose(parts: Sequence[View]) -> View:
    def view(x: torch.Tensor) -> torch.Tensor:
        for part in parts:
            x = part(x)
        return x

    return view


def tta_views(names: Sequence[str]) -> list[View]:
    """Every combination of the named views (one identity view when `names` is empty)."""
    return [_compose(parts) for parts in itertools.product(*[_options(n) for n in names])] or [_identity]


def describe(names: Sequence[str]) -> str:
    """'hflip: 2 views, probabilities averaged' for the report and the logs ('' without TTA)."""
    if not names:
        return ""
    return f"{', '.join(names)}: {len(tta_views(names))} views per image, calibrated probabilities averaged"


class ViewStack(nn.Module):
    """The model's logits for every view of a batch, side by side (N x views*C)."""

    def __init__(self, model: nn.Module, views: Sequence[View]) -> None:
        super().__init__()
        self.model = model
        self.views = list(views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(view(images)) for view in self.views], dim=1)


def average_views(logits: np.ndarray, views: int, temperature: float, task: Task | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the views' calibrated probabilities, log of the mean uncalibrated ones) from N x views*C logits."""
    task = task or SingleLabel()
    n = logits.shape[0]
    per_view = logits.reshape(n * views, -1)
    tempered = task.probs(per_view, temperature).reshape(n, views, -1).mean(axis=1)
    plain = task.probs(per_view).reshape(n, views, -1).mean(axis=1)
    return tempered, task.as_logits(plain)


def run_tta(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    names: Sequence[str],
    device: torch.device,
    paths: Sequence[str],
    temperature: float,
    progress: bool = True,
    desc: str = "predict",
    task: Task | None = None,
) -> Predictions:
    """Probabilities averaged over the views; `logits` are the log of the untempered average (the report's
    'before calibration'), `probs` the average of the calibrated ones."""
    task = task or SingleLabel()
    views = tta_views(names)
    stacked, targets = collect_logits(ViewStack(model, views), batches, device=device, progress=progress, desc=desc)
    if stacked.size == 0:
        return Predictions.from_logits(paths, stacked, targets, temperature=temperature, task=task)
    probs, logits = average_views(stacked, len(views), temperature, task)
    return Predictions(paths=list(paths), probs=probs, targets=targets, logits=logits, temperature=temperature, task=task)


def view_pixels(batch: np.ndarray, view: View) -> np.ndarray:
    """A view of an (N, H, W, 3) uint8 batch, the input of an exported model (crops are resampled in uint8)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    viewed = view(tensor).round().clamp(0, 255).to(torch.uint8)
    return viewed.permute(0, 2, 3, 1).contiguous().numpy()


def run_inference(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: torch.device,
    paths: Sequence[str],
    progress: bool = True,
    desc: str = "predict",
    temperature: float = 1.0,
    task: Task | None = None,
) -> Predictions:
    """Calibrated probabilities (the task's, of logits / temperature) for every batch of (images, targets), in order."""
    logits, targets = collect_logits(model, batches, device=device, progress=progress, desc=desc)
    return Predictions.from_logits(paths, logits, targets, temperature=temperature, task=task)
