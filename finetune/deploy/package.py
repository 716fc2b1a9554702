"""The exported graph: uint8 RGB images (N, H, W, 3), already resized and cropped, in; logits and probabilities out.

Scaling, mean/std normalisation and the NHWC -> NCHW layout change happen inside, so a consumer only decodes and
resizes (the `resize` rule in the metadata), exactly as `finetune predict` does.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from finetune.data.decode import load_image
from finetune.data.transforms import ImageConfig, resize_shorter_and_crop
from finetune.inference.task import SingleLabel, Task


class PackagedClassifier(nn.Module):
    """A trained model with its input normalisation and temperature built in."""

    mean: torch.Tensor
    std: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, model: nn.Module, image: ImageConfig, temperature: float, task: Task | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.task = task or SingleLabel()
        self.register_buffer("mean", torch.tensor(image.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(image.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
        logits = self.model(x)
        return logits, self.task.probabilities(logits, self.temperature)


def prepare_image(source: str | np.ndarray, image: ImageConfig) -> np.ndarray:
    """What every consumer of the exported model feeds it: finetune's decode (of a file; an RGB array is used as
    is), then timm's resize and centre crop."""
    pixels = source if isinstance(source, np.ndarray) else load_image(source)
    return resize_shorter_and_crop(pixels, size=image.input_size, crop_pct=image.crop_pct, interpolation=image.interpolation)


def image_batches(sources: Sequence[str | np.ndarray], image: ImageConfig, *, batch_size: int = 32) -> Iterator[np.ndarray]:
    """(N, H, W, 3) uint8 batches of prepared images, in order."""
    for start in range(0, len(sources), batch_size):
        yield np.stack([prepare_image(s, image) for s in sources[start : start + batch_size]])


@contextmanager
def pause_garbage_collection() -> Iterator[None]:
    """Collect first, then keep the cyclic collector off while an exporter traces the model. A finalizer that runs
    inside a trace has its tensor ops recorded into the graph: pytorch_grad_cam's GradCAM.__del__ calls detach_() on
    the activations it kept, and torch.fx then fails with KeyError '_tensor_constant0' (an Explainer left for the
    collector by train() before export() in one process failed 5 test runs in 8)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
