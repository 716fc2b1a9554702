"""Why the model decided: Grad-CAM heatmaps (the `grad-cam` package) at the last block of layer4, as the backbone
family names it (a ViT's tokens are laid out as their patch grid first).

A heatmap shows where, in the image the model saw (resized and centre-cropped), the evidence for a class lies.
`border_share` is the part of the heat in the outer tenth of the frame: a model that keys on frames, watermarks
or background shows it there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from finetune.config.catalog import Stage
from finetune.data.decode import load_image
from finetune.data.transforms import ImageConfig, build_eval_pipeline, resize_shorter_and_crop
from finetune.models.build import ModelBundle
from finetune.models.stages import last_block

BORDER = 0.1  # the outer tenth of each side
CAM_STAGES: tuple[Stage, ...] = ("layer4", "layer3", "layer2", "layer1")
MIN_MAP = 4  # below 4 x 4 cells a heatmap cannot tell a corner from the centre


@dataclass(frozen=True)
class Explanation:
    """One image's Grad-CAM for one class: the heat (H x W, 0..1), the picture the model saw, and the overlay."""

    path: str
    class_index: int
    heat: np.ndarray
    seen: np.ndarray  # RGB uint8, resized and cropped as for the model
    overlay: np.ndarray  # RGB uint8

    @property
    def border_share(self) -> float:
        """Share of the heat in the outer tenth of the frame (0.36 of the area)."""
        h, w = self.heat.shape
        by, bx = max(1, int(h * BORDER)), max(1, int(w * BORDER))
        inner = self.heat[by : h - by, bx : w - bx].sum()
        total = self.heat.sum()
        return float((total - inner) / total) if total > 0 else 0.0


def as_map(bundle: ModelBundle) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the hooked block's output becomes an (N, C, h, w) map: None when it is one (a CNN's), else the family's
    reshape (a ViT's tokens to their patch grid)."""
    reshape = bundle.stages.family.cam_reshape
    return functools.partial(reshape, bundle.model) if reshape is not None else None


def target_stage(bundle: ModelBundle, input_size: int, *, device: torch.device) -> tuple[Stage, tuple[int, int]]:
    """layer4, or the deepest stage whose map is still at least MIN_MAP x MIN_MAP at this input size (a 1 x 1 map
    has nowhere to point: layer4 of a 32 px image), with that map's size."""
    sizes: dict[Stage, tuple[int, int]] = {}
    reshape = as_map(bundle)

    def record(stage: Stage, output: torch.Tensor) -> None:
        height, width = (reshape(output) if reshape is not None else output).shape[-2:]
        sizes[stage] = (int(height), int(width))

    hooks = [
        last_block(bundle.stages, stage).register_forward_hook(lambda module, args, output, stage=stage: record(stage, output))
        for stage in CAM_STAGES
    ]
    try:
        with torch.inference_mode():
            bundle.model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    found = next((s for s in CAM_STAGES if min(sizes[s]) >= MIN_MAP), CAM_STAGES[-1])
    return found, sizes[found]


class Explainer:
    """Grad-CAM over a model with its own evaluation pipeline."""

    def __init__(self, bundle: ModelBundle, image: ImageConfig, *, device: torch.device | None = None) -> None:
        self.image = image
        self.pipeline = build_eval_pipeline(image)
        self.model = bundle.model.eval()
        device = device or next(self.model.parameters()).device
        self.model.to(device)
        self.stage, self.map_size = target_stage(bundle, image.input_size, device=device)
        self.cam = GradCAM(
            model=self.model, target_layers=[last_block(bundle.stages, self.stage)], reshape_transform=as_map(bundle)
        )

    @property
    def where(self) -> str:
        """Which layer the heatmaps come from, for the report."""
        return f"the last block of {self.stage} ({self.map_size[0]} x {self.map_size[1]} map at {self.image.input_size} px)"

    def explain(self, paths: Sequence[str], classes: Sequence[int], *, batch_size: int = 16) -> list[Explanation]:
        """Heatmaps of class `classes[i]` on image `paths[i]`."""
        found: list[Explanation] = []
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            pictures = [load_image(p) for p in chunk]
            batch = torch.stack([self.pipeline(image=p)["image"] for p in pictures])
            targets = [ClassifierOutputTarget(int(c)) for c in classes[start : start + batch_size]]
            with torch.enable_grad():
                heat = self.cam(input_tensor=batch, targets=targets)
            for path, picture, cls, cam in zip(chunk, pictures, classes[start:], heat):
                seen = resize_shorter_and_crop(
                    picture, size=self.image.input_size, crop_pct=self.image.crop_pct, interpolation=self.image.interpolation
                )
                overlay = show_cam_on_image(seen.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=0.55)
                found.append(Explanation(path=path, class_index=int(cls), heat=cam, seen=seen, overlay=overlay))
        return found
