"""Albumentations train/eval pipelines: presets or YAML lists, sized and normalised for the model."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from finetune.errors import RecipeError, did_you_mean
from finetune.recipe import TransformsConfig

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


@dataclass(frozen=True)
class ImageConfig:
    """What the model expects: square input size, normalisation and resize behaviour."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageConfig":
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            crop_pct=float(data.get("crop_pct", 0.875)),
        )


def resolve_image_config(cfg: TransformsConfig, model_defaults: dict[str, Any]) -> ImageConfig:
    """Recipe values win; the rest comes from timm's data config for the model."""
    size = cfg.input_size or int(model_defaults["input_size"][-1])
    return ImageConfig(
        input_size=size,
        mean=tuple(float(v) for v in (cfg.mean or model_defaults["mean"])),
        std=tuple(float(v) for v in (cfg.std or model_defaults["std"])),
        interpolation=str(model_defaults.get("interpolation", "bilinear")),
        crop_pct=float(cfg.crop_pct or model_defaults.get("crop_pct", 0.875)),
    )


def _transform_classes() -> dict[str, type]:
    return {
        name: obj
        for name, obj in vars(A).items()
        if isinstance(obj, type) and issubclass(obj, A.BasicTransform) and not name.startswith("_")
    }


def build_transform(name: str, kwargs: dict[str, Any]) -> A.BasicTransform:
    """One albumentations transform by class name; unknown names and arguments are errors, not warnings."""
    classes = _transform_classes()
    cls = classes.get(name)
    if cls is None:
        raise RecipeError(f"unknown albumentations transform '{name}'{did_you_mean(name, classes)}")
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("self", "args", "kwargs")]
    for key in kwargs:
        if key not in allowed and not accepts_any:
            raise RecipeError(f"{name} has no argument '{key}'{did_you_mean(key, allowed)}; valid: {', '.join(allowed)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())
        raise RecipeError(f"{name}({kwargs}) is invalid: {detail}") from None


def _preset(name: str, size: int, interpolation: int) -> list[A.BasicTransform]:
    crop = lambda scale: A.RandomResizedCrop(size=(size, size), scale=scale, interpolation=interpolation)  # noqa: E731
    if name == "light":
        return [crop((0.6, 1.0)), A.HorizontalFlip(p=0.5)]
    if name == "standard":
        return [crop((0.3, 1.0)), A.HorizontalFlip(p=0.5), A.ColorJitter(0.2, 0.2, 0.2, 0.02, p=0.8)]
    if name == "strong":
        return [
            crop((0.2, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), translate_percent=(-0.1, 0.1), p=0.5),
            A.ColorJitter(0.4, 0.4, 0.4, 0.05, p=0.8),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5),
        ]
    raise RecipeError(f"unknown transforms preset '{name}'")


def _finish(image: ImageConfig, interpolation: int) -> list[A.BasicTransform]:
    # Resize is a no-op for crops already at size; it guarantees batchable tensors for any user list.
    return [
        A.Resize(image.input_size, image.input_size, interpolation=interpolation),
        A.Normalize(mean=image.mean, std=image.std, max_pixel_value=255.0),
        ToTensorV2(),
    ]


def build_train_pipeline(cfg: TransformsConfig, image: ImageConfig, *, seed: int | None = None) -> A.Compose:
    """Augmentations from the recipe, then resize to the model's size and normalise; `none` is the eval pipeline."""
    if cfg.train == "none":  # no augmentation: train on exactly what evaluation sees (and what a feature cache can reuse)
        return build_eval_pipeline(image)
    interpolation = _INTERPOLATION.get(image.interpolation, cv2.INTER_LINEAR)
    if isinstance(cfg.train, str):
        steps = _preset(cfg.train, image.input_size, interpolation)
    else:
        steps = [build_transform(name, kwargs) for item in cfg.train for name, kwargs in item.items()]
    return A.Compose(steps + _finish(image, interpolation), seed=seed)


def build_eval_pipeline(image: ImageConfig) -> A.Compose:
    """timm-style evaluation: resize the short side to size/crop_pct, centre crop, normalise."""
    interpolation = _INTERPOLATION.get(image.interpolation, cv2.INTER_LINEAR)
    short_side = max(image.input_size, int(round(image.input_size / image.crop_pct)))
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=short_side, interpolation=interpolation),
            A.CenterCrop(image.input_size, image.input_size),
            *_finish(image, interpolation)[1:],
        ],
        seed=0,
    )


def save_pipeline(pipeline: A.Compose, path: Path) -> None:
    """albumentations' own versioned serialization; `A.load(path, data_format='yaml')` reads it back."""
    A.save(pipeline, str(path), data_format="yaml")


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
