"""Albumentations train/eval pipelines: presets or YAML lists, sized and normalised for the model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema, ImageOnlyTransform
from albumentations.pytorch import ToTensorV2
from PIL import Image
from pydantic import Field

from finetune.config.catalog import make_transform
from finetune.config.schema import TransformsConfig
from finetune.data.limits import fit_for_resize
from finetune.errors import RecipeError

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class ImageConfig:
    """What the model expects: square input size, normalisation and resize behaviour."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(
            input_size=int(data["input_size"]),
            mean=_triple(data["mean"]),
            std=_triple(data["std"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            crop_pct=float(data.get("crop_pct", DEFAULT_CROP_PCT)),
        )

    @property
    def cv2_interpolation(self) -> int:
        return _INTERPOLATION.get(self.interpolation, cv2.INTER_LINEAR)


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def resolve_image_config(cfg: TransformsConfig, model_defaults: dict[str, Any]) -> ImageConfig:
    """Recipe values win; the rest comes from timm's data config for the model."""
    return ImageConfig(
        input_size=cfg.input_size or int(model_defaults["input_size"][-1]),
        mean=_triple(cfg.mean or model_defaults["mean"]),
        std=_triple(cfg.std or model_defaults["std"]),
        interpolation=str(model_defaults.get("interpolation", "bilinear")),
        crop_pct=float(cfg.crop_pct or model_defaults.get("crop_pct", DEFAULT_CROP_PCT)),
    )


def _preset(name: str, size: int, interpolation: int) -> list[A.BasicTransform]:
    def crop(scale: tuple[float, float]) -> A.BasicTransform:
        return A.RandomResizedCrop(size=(size, size), scale=scale, interpolation=interpolation)

    presets: dict[str, list[A.BasicTransform]] = {
        "light": [crop((0.6, 1.0)), A.HorizontalFlip(p=0.5)],
        "standard": [crop((0.3, 1.0)), A.HorizontalFlip(p=0.5), A.ColorJitter(0.2, 0.2, 0.2, 0.02, p=0.8)],
        "strong": [
            crop((0.2, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), translate_percent=(-0.1, 0.1), p=0.5),
            A.ColorJitter(0.4, 0.4, 0.4, 0.05, p=0.8),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5),
        ],
    }
    return presets[name]


def _normalize(image: ImageConfig) -> list[A.BasicTransform]:
    return [A.Normalize(mean=image.mean, std=image.std, max_pixel_value=255.0), ToTensorV2()]


def build_train_pipeline(cfg: TransformsConfig, image: ImageConfig, *, seed: int | None = None) -> A.Compose:
    """Augmentations from the recipe, then resize to the model's size and normalise; `none` is the eval pipeline."""
    if cfg.train == "none":  # no augmentation: train on exactly what evaluation sees (and what a feature cache can reuse)
        return build_eval_pipeline(image)
    if isinstance(cfg.train, str):
        steps = _preset(cfg.train, image.input_size, image.cv2_interpolation)
    else:
        steps = [make_transform(name, kwargs) for item in cfg.train for name, kwargs in item.items()]
    # Resize is a no-op for crops already at size; it guarantees batchable tensors for any user list.
    resize = A.Resize(image.input_size, image.input_size, interpolation=image.cv2_interpolation)
    return A.Compose([*steps, resize, *_normalize(image)], seed=seed)


def resize_shorter_and_crop(image: np.ndarray, *, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """timm's evaluation geometry, pixel for pixel: the short side to floor(size / crop_pct) with Pillow, then a centre crop.

    Sizes and crop offsets use torchvision's arithmetic (`Resize(int)` truncates the long side, `CenterCrop`
    rounds the offset), and Pillow resamples with antialiasing, as timm's `create_transform(is_training=False)` does.
    A thin image is cut to the part the crop keeps first (`fit_for_resize`), so no shape asks for a huge resize.
    """
    scale = math.floor(size / crop_pct)
    image = fit_for_resize(image, short_side=scale, crop=size)
    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = scale, int(scale * height / width)
    else:
        new_w, new_h = int(scale * width / height), scale
    resized = np.asarray(
        Image.fromarray(image).resize((new_w, new_h), _PIL_RESAMPLE.get(interpolation, Image.Resampling.BILINEAR))
    )
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


class ResizeCenterCrop(ImageOnlyTransform):
    """`resize_shorter_and_crop` as an albumentations transform (serialisable once finetune.data.transforms is imported)."""

    class InitSchema(BaseTransformInitSchema):
        size: int = Field(ge=1)
        crop_pct: float = Field(gt=0.0, le=1.0)
        interpolation: str

    def __init__(self, size: int, crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bilinear", p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return resize_shorter_and_crop(img, size=self.size, crop_pct=self.crop_pct, interpolation=self.interpolation)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "crop_pct", "interpolation")


def build_eval_pipeline(image: ImageConfig) -> A.Compose:
    """timm's evaluation transform: short side to size/crop_pct, centre crop, normalise (see `resize_shorter_and_crop`)."""
    resize = ResizeCenterCrop(image.input_size, crop_pct=image.crop_pct, interpolation=image.interpolation)
    return A.Compose([resize, *_normalize(image)], seed=0)


def save_pipeline(pipeline: A.Compose, path: Path) -> None:
    """albumentations' own versioned serialization; `A.load(path, data_format='yaml')` reads it back."""
    A.save(pipeline, str(path), data_format="yaml")


def load_pipeline(path: Path) -> A.Compose:
    """A pipeline written by `save_pipeline`."""
    pipeline = A.load(str(path), data_format="yaml")
    if not isinstance(pipeline, A.Compose):
        raise TypeError(f"{path} holds a {type(pipeline).__name__}, not a Compose pipeline")
    return pipeline


def preview_augmentations(pipeline: A.Compose, images: list[np.ndarray], image: ImageConfig, *, views: int) -> list[np.ndarray]:
    """`views` random draws of `pipeline` per image, turned back from normalised tensors into RGB uint8."""
    mean = np.asarray(image.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None, None]
    out = []
    for picture in images:
        for _ in range(views):
            tensor = pipeline(image=picture)["image"]
            array = np.asarray(tensor, dtype=np.float32) * std + mean
            out.append(np.clip(array.transpose(1, 2, 0) * 255.0, 0, 255).astype(np.uint8))
    return out


def check_pipeline(pipeline: A.Compose, image: np.ndarray, *, source: str) -> None:
    """Run each step once (forced, whatever its p) on a real image, so a transform that validates but cannot run
    fails now, with its own message, instead of at the first batch."""
    data: dict[str, Any] = {"image": image}
    for step in pipeline.transforms:
        try:
            data = step(force_apply=True, **data)
        except Exception as exc:  # albumentations and OpenCV raise many types
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise RecipeError(
                f"transforms.train: {type(step).__name__} fails on {source}: {detail}; change its arguments in the recipe"
            ) from None
