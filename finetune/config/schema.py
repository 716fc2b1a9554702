"""The recipe: one strict pydantic schema that every stage reads (YAML keys equal field names)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.config.catalog import (
    IMAGE_EXTENSIONS,
    STAGES,
    TRAIN_PRESETS,
    BnPolicy,
    Stage,
    TrainPreset,
    known_model_names,
    transform_arguments,
    transform_classes,
)
from finetune.errors import did_you_mean

SINGLE_PHASE_FIELDS = ("epochs", "lr", "trainable", "freeze", "bn")  # the one-phase shorthand; phases replace them


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class DataConfig(_Strict):
    """Where the images are and how they are split and batched."""

    path: Path | None = Field(None, description="Image folder (flat or train/val/test) or a CSV manifest.")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    sampler: Literal["shuffle", "weighted"] = Field("shuffle", description="weighted: draw classes equally often.")
    bad_images: Literal["skip", "fail"] = Field(
        "skip", description="skip: list unreadable files in RUN/skipped.csv; fail: stop before training."
    )
    strict_split: bool = Field(False, description="Duplicates across train/val/test are an error instead of a warning.")
    group_pattern: str | None = Field(
        None, description="Regex on the file name; its first group (or match) keeps a group in one split."
    )
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS), min_length=1)

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


class TransformsConfig(_Strict):
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


class HeadConfig(_Strict):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    hidden: int | None = Field(None, ge=1)


class ModelConfig(_Strict):
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
                f"unknown model '{value}'{did_you_mean(value, names)}; ResNet-family timm names or 'tv:' + a torchvision ResNet"
            )
        return value

    @field_validator("pretrained", mode="before")
    @classmethod
    def _path_or_bool(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value


Trainable = Literal["all"] | list[Stage]


def _nonempty(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("at least one stage must be trainable")
    return value


def stages_of(trainable: Trainable) -> tuple[Stage, ...]:
    """The trainable stages in forward order ('all' is every stage)."""
    return STAGES if trainable == "all" else tuple(s for s in STAGES if s in trainable)


class PhaseConfig(_Strict):
    """One block of epochs with a fixed set of trainable stages (`train:` is accepted for `trainable:`)."""

    epochs: int = Field(ge=1)
    trainable: Trainable = "all"
    lr: float = Field(gt=0.0, le=10.0)
    lr_mult: dict[Stage, float] = Field(default_factory=dict)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    bn: BnPolicy = "frozen"

    @model_validator(mode="before")
    @classmethod
    def _train_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "train" in data:
            if "trainable" in data:
                raise ValueError("give 'trainable' (or its older name 'train'), not both")
            data = {("trainable" if k == "train" else k): v for k, v in data.items()}
        return data

    _trainable_nonempty = field_validator("trainable")(_nonempty)

    def trainable_stages(self) -> tuple[Stage, ...]:
        return stages_of(self.trainable)


class EarlyStoppingConfig(_Strict):
    metric: Literal["val_accuracy", "val_loss", "val_macro_f1"] = "val_accuracy"
    patience: int | None = Field(None, ge=1, description="Epochs without improvement before stopping; null = off.")
    min_delta: float = Field(0.0, ge=0.0)
    restore_best: bool = Field(False, description="At the end of each phase, go back to that phase's best weights.")


class TrainConfig(_Strict):
    """Optimisation: `epochs`/`lr`/`trainable`/`bn` (one phase) or a list of `phases`.

    `freeze: [stem, layer1]` is the one-phase alias of `trainable:`: every stage it does not list trains.
    """

    epochs: int = Field(5, ge=1, le=10000)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    trainable: Trainable | None = Field(None, description="Stages that train (default: all).")
    freeze: list[Stage] | None = Field(None, description="Alias: the stages that do not train.")
    bn: BnPolicy = "frozen"
    phases: list[PhaseConfig] | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.01, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    feature_cache: Literal["auto", "off"] = Field(
        "auto", description="Head-only phases with frozen BN train on pooled features cached on disk (FINETUNE_CACHE_DIR)."
    )
    cache_views: int = Field(0, ge=0, le=64, description="Cache this many augmented views per image (0: the eval pipeline only).")

    _trainable_nonempty = field_validator("trainable")(_nonempty)

    @model_validator(mode="after")
    def _phases_or_single(self) -> TrainConfig:
        if self.phases is not None:
            if not self.phases:
                raise ValueError("phases is an empty list; remove it or give at least one phase")
            set_here = self.model_fields_set & set(SINGLE_PHASE_FIELDS)
            if set_here:
                raise ValueError(f"{sorted(set_here)} conflict with phases; set epochs/lr/trainable/bn per phase instead")
        if self.trainable is not None and self.freeze is not None:
            raise ValueError("give 'trainable' or 'freeze' (the stages that do not train), not both")
        if self.freeze is not None and set(self.freeze) == set(STAGES):
            raise ValueError("freeze lists every stage, so nothing would train; leave at least 'head' out")
        return self

    def single_phase_stages(self) -> tuple[Stage, ...]:
        """The trainable stages of the one-phase form (`trainable`, else every stage not in `freeze`)."""
        if self.freeze is not None:
            return tuple(s for s in STAGES if s not in self.freeze)
        return stages_of(self.trainable or "all")

    def resolved_phases(self) -> list[PhaseConfig]:
        """The phases to run; a recipe without phases is one phase."""
        if self.phases is not None:
            return list(self.phases)
        stages = self.single_phase_stages()
        return [PhaseConfig(epochs=self.epochs, lr=self.lr, trainable="all" if stages == STAGES else list(stages), bn=self.bn)]


class LossConfig(_Strict):
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


class EvalConfig(_Strict):
    top_k: int = Field(5, ge=1, le=100)
    calibration: Literal["temperature", "off"] = Field(
        "temperature", description="Fit a temperature on the validation split after training; applied in eval, predict, export."
    )
    gradcam: bool = Field(True, description="Grad-CAM heatmaps beside the report's gallery images.")


class Recipe(_Strict):
    """A complete, validated training recipe."""

    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (paths as strings), suitable for YAML and checkpoints; reloads to an equal recipe."""
        if self.train.phases is not None:
            unused = set(SINGLE_PHASE_FIELDS)
        else:
            unused = {name for name in ("trainable", "freeze") if getattr(self.train, name) is None}
        return self.model_dump(mode="json", exclude={"train": unused})

    def with_data(self, path: Path | str | None) -> Recipe:
        """The same recipe reading its images from `path` (the `--data` option)."""
        return self.model_copy(update={"data": self.data.model_copy(update={"path": Path(path) if path is not None else None})})
