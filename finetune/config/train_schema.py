"""The recipe's `train:` section: phases of trainable stages, optimizer, schedule, EMA, mixup, early stopping."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator

from finetune.config.catalog import STAGES, NormPolicy, Stage
from finetune.config.strict import Strict
from finetune.errors import did_you_mean

SINGLE_PHASE_FIELDS = ("epochs", "lr", "trainable", "freeze", "norm")  # the one-phase shorthand; phases replace them
SCHEDULER_FIELDS = {"decay_epochs": ("step",), "decay_rate": ("step", "plateau"), "patience_epochs": ("plateau",)}

Trainable = Literal["all"] | list[Stage]
# (field, older spelling): both are read, one at a time; a `--set` of either replaces the other
SPELLINGS: tuple[tuple[str, str], ...] = (("norm", "bn"),)
NORM_DESCRIPTION = (
    "frozen: BatchNorm running statistics stay fixed in frozen stages (their affine parameters, and LayerNorm's, "
    "always do); train: BatchNorm statistics of frozen stages update. Older spelling: bn."
)


def _norm_field() -> Any:
    return Field("frozen", validation_alias=AliasChoices("norm", "bn"), description=NORM_DESCRIPTION)


def _one_spelling(data: Any) -> Any:
    """Refuse a section that gives a field under both its names (`norm` and its older `bn`)."""
    if isinstance(data, dict):
        for name, older in SPELLINGS:
            if name in data and older in data:
                raise ValueError(f"give '{name}' (or its older name '{older}'), not both")
    return data


def _nonempty(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("at least one stage must be trainable")
    return value


def _known_stages(value: Any, info: ValidationInfo) -> Any:
    """Stage names checked before pydantic's own validation, so a misspelt one is one line that names the stages,
    not an error per branch of `'all' | list of stages`."""
    every = info.field_name == "trainable"  # `freeze: all` would leave nothing to train
    if (every and value == "all") or value is None:
        return value
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    stages = ", ".join(STAGES) + (", or 'all' for every one" if every else "")
    for name in names:
        if name not in STAGES:
            raise ValueError(f"{name!r} is not a stage{did_you_mean(str(name), STAGES)}; the stages are {stages}")
    if isinstance(value, str):
        raise ValueError(f"give a list of stages, e.g. [{value}]" + (", or 'all'" if every else ""))
    return value


def stages_of(trainable: Trainable) -> tuple[Stage, ...]:
    """The trainable stages in forward order ('all' is every stage)."""
    return STAGES if trainable == "all" else tuple(s for s in STAGES if s in trainable)


class PhaseConfig(Strict):
    """One block of epochs with a fixed set of trainable stages (`train:` is accepted for `trainable:`)."""

    epochs: int = Field(ge=1)
    trainable: Trainable = "all"
    lr: float = Field(gt=0.0, le=10.0)
    lr_mult: dict[Stage, float] = Field(default_factory=dict)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    norm: NormPolicy = _norm_field()

    @model_validator(mode="before")
    @classmethod
    def _train_alias(cls, data: Any) -> Any:
        data = _one_spelling(data)
        if isinstance(data, dict) and "train" in data:
            if "trainable" in data:
                raise ValueError("give 'trainable' (or its older name 'train'), not both")
            data = {("trainable" if k == "train" else k): v for k, v in data.items()}
        return data

    _trainable_nonempty = field_validator("trainable")(_nonempty)
    _trainable_known = field_validator("trainable", mode="before")(_known_stages)

    def trainable_stages(self) -> tuple[Stage, ...]:
        return stages_of(self.trainable)

    @property
    def bn(self) -> NormPolicy:
        """`norm` under its older name."""
        return self.norm


class EarlyStoppingConfig(Strict):
    metric: Literal["auto", "val_accuracy", "val_loss", "val_macro_f1", "val_mean_average_precision"] = Field(
        "auto",
        description="What early stopping and best.pt follow; auto: the task's own (val_accuracy for one label per "
        "image, val_mean_average_precision for several).",
    )
    patience: int | None = Field(None, ge=1, description="Epochs without improvement before stopping; null = off.")
    min_delta: float = Field(0.0, ge=0.0)
    restore_best: bool = Field(False, description="At the end of each phase, go back to that phase's best weights.")

    def monitored(self, task_metric: str) -> str:
        """The metric followed: the recipe's, or with `auto` the task's own."""
        return task_metric if self.metric == "auto" else self.metric


class EmaConfig(Strict):
    """An exponential moving average of the trained weights (timm's ModelEmaV3), validated beside the raw ones."""

    decay: float = Field(0.9998, gt=0.0, lt=1.0)
    warmup: bool = Field(True, description="timm's decay warmup: short runs average over the steps they have.")
    evaluate: Literal["ema", "raw", "both"] = Field(
        "ema", description="Which weights early stopping and best.pt follow; both: whichever validates better."
    )


class MixupConfig(Strict):
    """timm's Mixup / CutMix of image pairs and their labels (with the recipe's label smoothing)."""

    mixup_alpha: float = Field(0.8, ge=0.0)
    cutmix_alpha: float = Field(1.0, ge=0.0)
    prob: float = Field(1.0, gt=0.0, le=1.0, description="Share of batches that are mixed.")
    switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="With both alphas above 0: share of mixed batches cut-mixed.")
    off_epoch: int | None = Field(None, ge=1, description="Last epoch (counted over all phases) that mixes; later ones don't.")

    @model_validator(mode="after")
    def _some_alpha(self) -> MixupConfig:
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError(
                "mixup_alpha and cutmix_alpha are both 0, so nothing would mix; set one above 0 or remove train.mixup"
            )
        return self

    def active(self, epoch: int) -> bool:
        """Whether epoch `epoch` (from 1) mixes its batches."""
        return self.off_epoch is None or epoch <= self.off_epoch


class TrainConfig(Strict):
    """Optimisation: `epochs`/`lr`/`trainable`/`norm` (one phase) or a list of `phases`.

    `freeze: [stem, layer1]` is the one-phase alias of `trainable:`: every stage it does not list trains.
    """

    epochs: int = Field(5, ge=1, le=10000)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    trainable: Trainable | None = Field(None, description="Stages that train (default: all).")
    freeze: list[Stage] | None = Field(None, description="Alias: the stages that do not train.")
    norm: NormPolicy = _norm_field()
    phases: list[PhaseConfig] | None = None
    optimizer: Literal["adamw", "sgd", "lamb", "lion"] = Field("adamw", description="timm's optimizers of these names.")
    weight_decay: float = Field(0.01, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "constant", "step", "plateau"] = "cosine"
    decay_epochs: float = Field(10.0, gt=0.0, description="step: multiply the LR by decay_rate every this many epochs.")
    decay_rate: float = Field(0.1, gt=0.0, lt=1.0, description="step and plateau: the factor of each decay.")
    patience_epochs: int = Field(2, ge=0, description="plateau: epochs without improvement of the early-stopping metric.")
    warmup_epochs: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with native bf16, if the first batch agrees with fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="NHWC memory layout for model and batches; auto: on with bf16 autocast on a CPU with native bf16.",
    )
    compile: bool = Field(False, description="torch.compile the training forward (first steps slower; checkpoints unchanged).")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig | None = Field(None, description="Average the weights over steps; null: off.")
    mixup: MixupConfig | None = Field(None, description="Mix image pairs and their labels; null: off.")
    feature_cache: Literal["auto", "off"] = Field(
        "auto", description="Head-only phases with frozen BN train on pooled features cached on disk (FINETUNE_CACHE_DIR)."
    )
    cache_views: int = Field(0, ge=0, le=64, description="Cache this many augmented views per image (0: the eval pipeline only).")
    cache_precision: Literal["fp16", "fp32"] = Field("fp16", description="How cached prefix activations are stored.")
    cache_budget_gb: float = Field(4.0, gt=0.0, description="Cached prefix activations above this size (GiB) are not cached.")

    _trainable_nonempty = field_validator("trainable")(_nonempty)
    _stages_known = field_validator("trainable", "freeze", mode="before")(_known_stages)

    @model_validator(mode="before")
    @classmethod
    def _norm_once(cls, data: Any) -> Any:
        return _one_spelling(data)

    @model_validator(mode="after")
    def _phases_or_single(self) -> TrainConfig:
        if self.phases is not None:
            if not self.phases:
                raise ValueError("phases is an empty list; remove it or give at least one phase")
            set_here = self.model_fields_set & set(SINGLE_PHASE_FIELDS)
            if set_here:
                raise ValueError(f"{sorted(set_here)} conflict with phases; set epochs/lr/trainable/norm per phase instead")
        if self.trainable is not None and self.freeze is not None:
            raise ValueError("give 'trainable' or 'freeze' (the stages that do not train), not both")
        if self.freeze is not None and set(self.freeze) == set(STAGES):
            raise ValueError("freeze lists every stage, so nothing would train; leave at least 'head' out")
        return self

    @model_validator(mode="after")
    def _scheduler_fields(self) -> TrainConfig:
        for name, schedulers in SCHEDULER_FIELDS.items():
            if name in self.model_fields_set and self.scheduler not in schedulers:
                raise ValueError(f"{name} is used by scheduler {' or '.join(schedulers)}, not '{self.scheduler}'; remove it")
        return self

    @property
    def bn(self) -> NormPolicy:
        """`norm` under its older name."""
        return self.norm

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
        return [
            PhaseConfig(epochs=self.epochs, lr=self.lr, trainable="all" if stages == STAGES else list(stages), norm=self.norm)
        ]

    def phase_epochs(self) -> list[range]:
        """The epochs (counted from 1 over the whole run) of each resolved phase."""
        ranges, first = [], 1
        for phase in self.resolved_phases():
            ranges.append(range(first, first + phase.epochs))
            first += phase.epochs
        return ranges

    def with_epochs(self, epochs: list[int]) -> TrainConfig:
        """The same training with each phase's epochs replaced (one number per resolved phase)."""
        if self.phases is None:
            return self.model_copy(update={"epochs": epochs[0]})
        phases = [p.model_copy(update={"epochs": e}) for p, e in zip(self.phases, epochs, strict=True)]
        return self.model_copy(update={"phases": phases})
