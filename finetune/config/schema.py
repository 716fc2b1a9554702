"""The recipe: one strict pydantic schema that every stage reads (YAML keys equal field names)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finetune.config.catalog import (
    IMAGE_EXTENSIONS,
    STAGES,
    TRAIN_PRESETS,
    TrainPreset,
    family_listing,
    known_model_names,
    transform_arguments,
    transform_classes,
)
from finetune.config.strict import Strict
from finetune.config.train_schema import (
    SCHEDULER_FIELDS,
    SINGLE_PHASE_FIELDS,
    EarlyStoppingConfig,
    EmaConfig,
    MixupConfig,
    PhaseConfig,
    Trainable,
    TrainConfig,
    stages_of,
)
from finetune.errors import did_you_mean

__all__ = [
    "DataConfig",
    "EarlyStoppingConfig",
    "EmaConfig",
    "EvalConfig",
    "HeadConfig",
    "LossConfig",
    "MixupConfig",
    "ModelConfig",
    "PhaseConfig",
    "Recipe",
    "TrainConfig",
    "Trainable",
    "TransformsConfig",
    "stages_of",
]

TtaView = Literal["hflip", "vflip", "five_crop"]
LogSink = Literal["csv", "tensorboard", "mlflow"]


class DataConfig(Strict):
    """Where the images are and how they are split and batched."""

    path: Path | None = Field(None, description="Image folder (flat or train/val/test) or a CSV manifest.")
    task: Literal["auto", "single_label", "multilabel"] = Field(
        "auto",
        description="auto: several labels per image when the manifest has a `labels` column (names joined by |), "
        "else one (a `label` column or class folders).",
    )
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    keep_decoded_mb: float = Field(
        1024, ge=0, description="With num_workers 0, keep up to this many MB of decoded images in memory between epochs."
    )
    sampler: Literal["shuffle", "weighted"] = Field("shuffle", description="weighted: draw classes equally often.")
    bad_images: Literal["skip", "fail"] = Field(
        "skip", description="skip: list unreadable files in RUN/skipped.csv; fail: stop before training."
    )
    strict_split: bool = Field(False, description="Duplicates across train/val/test are an error instead of a warning.")
    group_pattern: str | None = Field(
        None, description="Regex on the file name; its first group (or match) keeps a group in one split."
    )
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS), min_length=1)
    exclude: Path | None = Field(
        None, description="CSV with a `path` column (e.g. an audit's label_issues.csv, edited): those images are left out."
    )

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("extensions")
    @classmethod
    def _lower_dotted(cls, value: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else f".{e.lower()}" for e in value]

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9 so that training keeps data")
        return self


TransformList = list[dict[str, dict[str, Any]]]


def _check_transform(item: Any) -> dict[str, dict[str, Any]]:
    """One `- Name: {arg: value}` entry: a known albumentations class whose arguments exist and construct."""
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"each transform is a one-key mapping like '- HorizontalFlip: {{p: 0.5}}', got {item!r}")
    ((name, kwargs),) = item.items()
    kwargs = kwargs or {}
    classes = transform_classes()
    if name not in classes:
        raise ValueError(f"unknown albumentations transform '{name}'{did_you_mean(name, classes)}")
    allowed, accepts_any = transform_arguments(classes[name])
    for key in kwargs:
        if key not in allowed and not accepts_any:
            raise ValueError(f"{name} has no argument '{key}'{did_you_mean(key, allowed)}; valid: {', '.join(allowed)}")
    try:
        classes[name](**kwargs)
    except (ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{name}({kwargs}) is invalid: {detail}") from None
    return {name: kwargs}


class TransformsConfig(Strict):
    """Albumentations pipelines; size and normalisation default to the model's pretrained config."""

    train: TrainPreset | TransformList = "standard"
    input_size: int | None = Field(None, ge=16, le=2048)
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: Any) -> Any:
        if value is not None and min(value) <= 0:
            raise ValueError("every std value must be above 0")
        return value

    @field_validator("train", mode="before")
    @classmethod
    def _check_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in TRAIN_PRESETS:
            raise ValueError(
                f"unknown preset '{value}'{did_you_mean(value, TRAIN_PRESETS)}; "
                f"use one of {list(TRAIN_PRESETS)} or a list of transforms"
            )
        if isinstance(value, list):
            return [_check_transform(item) for item in value]
        return value


class HeadConfig(Strict):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    hidden: int | None = Field(None, ge=1, le=65536)


class ModelConfig(Strict):
    name: str = "resnet18"
    pretrained: bool | Path = False
    head: HeadConfig = Field(default_factory=HeadConfig)
    small_input: bool = Field(False, description="3x3/stride-1 stem, no max-pool (CIFAR-style) for 32-64 px images.")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        names = known_model_names()
        if value not in names:
            raise ValueError(
                f"unknown model '{value}'{did_you_mean(value, names)}; the backbone families are: {family_listing()}"
            )
        return value

    @field_validator("pretrained", mode="before")
    @classmethod
    def _path_or_bool(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value


class LossConfig(Strict):
    """Cross-entropy options."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced", "effective_number"] | dict[str, float] = "none"
    beta: float = Field(0.999, gt=0.0, lt=1.0, description="effective_number's beta (Cui et al. 2019).")

    @field_validator("class_weights")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(w <= 0 for w in value.values()):
            raise ValueError("class weights must be above 0")
        return value


class ThresholdConfig(Strict):
    """How each class's decision threshold is chosen on the validation split (several labels per image)."""

    rule: Literal["f1", "precision"] = Field("f1", description="f1: the most F1 per class; precision: reach `target`.")
    target: float = Field(0.9, gt=0.0, le=1.0, description="The precision each class should reach (rule: precision).")


class EvalConfig(Strict):
    top_k: int = Field(5, ge=1, le=100)
    threshold: ThresholdConfig = Field(
        default_factory=ThresholdConfig, description="Several labels per image: per-class thresholds chosen on val."
    )
    calibration: Literal["temperature", "off"] = Field(
        "temperature", description="Fit a temperature on the validation split after training; applied in eval, predict, export."
    )
    gradcam: bool = Field(True, description="Grad-CAM heatmaps beside the report's gallery images.")
    tta: list[TtaView] = Field(
        default_factory=list, description="Test-time views whose probabilities are averaged in eval, predict and the report."
    )

    @field_validator("tta")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each view once: {value}")
        return value


def _csv_only() -> list[LogSink]:
    return ["csv"]


class Recipe(Strict):
    """A complete, validated training recipe."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy and scikit-learn take seeds below 2**32.")
    data: DataConfig = Field(default_factory=DataConfig)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: list[LogSink] = Field(
        default_factory=_csv_only, description="Where epochs are logged besides metrics.csv (always written)."
    )

    @model_validator(mode="after")
    def _mixup_sees_images(self) -> Recipe:
        mixup = self.train.mixup
        if mixup is None:
            return self
        if self.data.batch_size < 2:
            raise ValueError("train.mixup mixes pairs of images of a batch; set data.batch_size to 2 or more")
        for number, (phase, epochs) in enumerate(zip(self.train.resolved_phases(), self.train.phase_epochs(), strict=True)):
            if self.cache_blocker(phase) is None and mixup.active(epochs[0]):
                raise ValueError(
                    f"train.mixup mixes images, but phase {number + 1} (epochs {epochs[0]}-{epochs[-1]}) trains on cached "
                    "outputs of its frozen stages, which are not images; set train.feature_cache: off to train it on images"
                    + (f", or train.mixup.off_epoch: {epochs[0] - 1} to stop mixing before it" if epochs[0] > 1 else "")
                )
        return self

    def cache_blocker(self, phase: PhaseConfig) -> str | None:
        """Why `phase` cannot train on its frozen prefix's cached outputs (None: it can, in a single process)."""
        if self.train.feature_cache == "off":
            return "train.feature_cache is off"
        stages = phase.trainable_stages()
        if stages == STAGES:
            return "every stage trains, so no frozen prefix's output can be cached"
        if stages != STAGES[STAGES.index(stages[0]) :]:
            return f"the phase trains {', '.join(stages)}: a frozen stage comes after a trainable one"
        if phase.norm != "frozen":
            return "norm: train (the older bn: train) lets the frozen stages' BatchNorm statistics move, so their outputs change every step"
        if self.transforms.train != "none" and self.train.cache_views == 0:
            return "the train pipeline augments; set train.cache_views: K to cache K augmented views, or transforms.train: none"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (paths as strings), suitable for YAML and checkpoints; reloads to an equal recipe."""
        if self.train.phases is not None:
            unused = set(SINGLE_PHASE_FIELDS)
        else:
            unused = {name for name in ("trainable", "freeze") if getattr(self.train, name) is None}
        unused |= {name for name, schedulers in SCHEDULER_FIELDS.items() if self.train.scheduler not in schedulers}
        return self.model_dump(mode="json", exclude={"train": unused})

    def with_data(self, path: Path | str | None) -> Recipe:
        """The same recipe reading its images from `path` (the `--data` option)."""
        return self.model_copy(update={"data": self.data.model_copy(update={"path": Path(path) if path is not None else None})})

    def with_epochs(self, *, scale: float | None = None, cap: int | None = None, total: int | None = None) -> Recipe:
        """The same recipe trained shorter (or longer): `total` epochs in all, or every phase's epochs times `scale`,
        then at most `cap` epochs in all (phases change in proportion, each keeping at least one epoch)."""
        epochs = [p.epochs for p in self.train.resolved_phases()]
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the epochs scale must be a finite number above 0 (got {scale})")
        if total is not None:
            if total < len(epochs):
                raise ValueError(f"the recipe has {len(epochs)} phases; {total} epoch(s) in all cannot give each one epoch")
            epochs = _shrink(epochs, total)
        if scale is not None:
            epochs = [max(1, round(e * scale)) for e in epochs]
        if cap is not None and sum(epochs) > cap:
            if cap < len(epochs):
                raise ValueError(f"the recipe has {len(epochs)} phases; at most {cap} epochs cannot give each one epoch")
            epochs = _shrink(epochs, cap)
        shorter = self.model_copy(update={"train": self.train.with_epochs(epochs)})
        return Recipe.model_validate(shorter.to_dict())  # every rule checked again on the new phase lengths


def _shrink(epochs: list[int], total: int) -> list[int]:
    """`epochs` scaled to sum to `total` in proportion (largest remainders round up), every entry at least 1."""
    target = [total * e / sum(epochs) for e in epochs]
    given = [max(1, int(t)) for t in target]
    while sum(given) > total:  # the minimum of 1 took epochs from elsewhere: the furthest above its share gives one
        i = max((i for i in range(len(given)) if given[i] > 1), key=lambda i: given[i] - target[i])
        given[i] -= 1
    while sum(given) < total:
        i = max(range(len(given)), key=lambda i: target[i] - given[i])
        given[i] += 1
    return given
