"""Test-time augmentation: the eval-pipeline tensor seen through several views, calibrated probabilities averaged.

Views are combined in the recipe's order: `[hflip]` is 2 views (as is, mirrored), `[hflip, vflip]` 4, `five_crop`
replaces each view by its four corner and centre crops (87.5% of the side, resized back), so `[hflip, five_crop]`
is 10. The temperature fitted on single-view validation logits is applied to every view before averaging.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from finetune.evaluation.inference import Predictions, softmax
from finetune.training.validation import collect_logits

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


def average_views(logits: np.ndarray, views: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean of softmax(view logits / T), log of the mean untempered softmax) from N x views*C logits."""
    n = logits.shape[0]
    per_view = logits.reshape(n * views, -1)
    tempered = softmax(per_view / temperature).reshape(n, views, -1).mean(axis=1)
    plain = softmax(per_view).reshape(n, views, -1).mean(axis=1)
    return tempered, np.log(np.maximum(plain, np.finfo(np.float32).tiny))


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
) -> Predictions:
    """Probabilities averaged over the views; `logits` are the log of the untempered average (the report's
    'before calibration'), `probs` the average of the calibrated ones."""
    views = tta_views(names)
    stacked, targets = collect_logits(ViewStack(model, views), batches, device=device, progress=progress, desc=desc)
    if stacked.size == 0:
        return Predictions.from_logits(paths, stacked, targets, temperature=temperature)
    probs, logits = average_views(stacked, len(views), temperature)
    return Predictions(paths=list(paths), probs=probs, targets=targets, logits=logits, temperature=temperature)


def view_pixels(batch: np.ndarray, view: View) -> np.ndarray:
    """A view of an (N, H, W, 3) uint8 batch, the input of an exported model (crops are resampled in uint8)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    viewed = view(tensor).round().clamp(0, 255).to(torch.uint8)
    return viewed.permute(0, 2, 3, 1).contiguous().numpy()
