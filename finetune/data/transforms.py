"""Albumentations train/eval pipelines: presets or YAML lists, sized and normalised for the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from finetune.config.catalog import make_transform
from finetune.config.schema import TransformsConfig

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
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


def build_eval_pipeline(image: ImageConfig) -> A.Compose:
    """timm-style evaluation: resize the short side to size/crop_pct, centre crop, normalise."""
    short_side = max(image.input_size, int(round(image.input_size / image.crop_pct)))
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=short_side, interpolation=image.cv2_interpolation),
            A.CenterCrop(image.input_size, image.input_size),
            *_normalize(image),
        ],
        seed=0,
    )


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
