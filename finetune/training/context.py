"""What a fit carries between its steps: the resumable state, the inputs, the fixed environment and the phase."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.config.schema import PhaseConfig, Recipe
from finetune.data.loader import ImageDataset
from finetune.data.stream import ShardStream
from finetune.data.transforms import ImageConfig
from finetune.inference.task import SingleLabel, Task
from finetune.models.stages import FreezePlan
from finetune.run_dir import RunDir
from finetune.training.addons import PROGRESS_FIELDS, AddOns
from finetune.training.checkpoint import CheckpointSaver
from finetune.training.distributed import Ranks
from finetune.training.early_stopping import EarlyStopping
from finetune.training.ema import StageEma
from finetune.training.feature_cache import CachedPhase
from finetune.training.mixup import Mixer
from finetune.training.optim import Schedule
from finetune.training.tracking import Trackers


@dataclass
class FitState:
    """Where training stands; stored in `last.pt` so `--resume` continues exactly.

    In `last.pt` the progress fields and each add-on's state sit side by side: {"epoch": 3, ..., "stopping": {...},
    "ema": {...}, "optimizer": {...}, "scheduler": {...}}.
    """

    epoch: int = 0  # epochs completed over all phases
    phase: int = 0
    phase_epoch: int = 0  # epochs completed within `phase`
    finished: bool = False  # every phase has run (or stopped early): the run can be exported
    addons: dict[str, Any] = field(default_factory=dict)  # each registered add-on's state_dict(), by its name

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROGRESS_FIELDS} | self.addons

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> FitState:
        """The state stored in a `last.pt` payload: the progress fields, and every other entry as an add-on's state."""
        stored = payload["training_state"]
        addons = {k: v for k, v in stored.items() if k not in PROGRESS_FIELDS}
        return cls(**{k: stored[k] for k in PROGRESS_FIELDS if k in stored}, addons=addons)


@dataclass
class FitContext:
    """Everything `fit` needs besides the model: data, recipe, where to write."""

    recipe: Recipe
    class_names: list[str]
    image: ImageConfig
    train_set: ImageDataset | ShardStream  # files, or the train shards streamed (data.path a shard folder)
    val_set: ImageDataset
    run: RunDir
    class_weights: list[float] | None = None
    cache_dir: Path = Path(".cache") / "finetune" / "features"  # where head-only phases keep backbone features
    progress: bool = True
    on_epoch_end: Callable[[FitState], None] | None = None
    trackers: Trackers | None = None  # TensorBoard / MLflow beside metrics.csv
    task: Task = field(default_factory=SingleLabel)  # what a label is: loss, validation metrics, checkpoint's task

    @property
    def monitored(self) -> str:
        """The metric early stopping, plateau decay and best.pt follow (the recipe's, or the task's for `auto`)."""
        return self.recipe.train.early_stopping.monitored(self.task.early_stopping_metric)


@dataclass
class Env:
    """What stays fixed over a fit: device, precision, loss, processes, the add-ons and the checkpoint writer."""

    device: torch.device
    dtype: torch.dtype | None  # the autocast the run trains in (train.amp, `auto` decided on the first batch)
    channels_last: bool  # the model and its batches in NHWC layout (train.channels_last, `auto` decided with amp)
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ranks: Ranks
    stopping: EarlyStopping
    saver: CheckpointSaver
    total_epochs: int
    ema: StageEma | None  # the averaged weights (train.ema), updated after every step
    mixer: Mixer | None  # mixup / cutmix of training batches (train.mixup)
    mixed_criterion: nn.Module | None  # the loss against the mixer's soft targets
    addons: AddOns  # every stateful add-on by name: what last.pt keeps besides the progress fields


@dataclass
class Phase:
    """One phase ready to train: what trains, on which data, with which optimizer and schedule."""

    index: int
    config: PhaseConfig
    plan: FreezePlan
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    net: nn.Module  # what training batches go through: the model, its DDP wrapper, or the head on cached features
    val_net: nn.Module
    ema_val_net: nn.Module | None  # the EMA weights on the same validation inputs
    train_set: Any
    val_batches: Iterable[Any]
    cached: CachedPhase | None
    drop_lone_last: bool  # BatchNorm trains: a last batch of one image is left out of each epoch
    setup_started: float | None  # the phase's first epoch is charged its preparation (feature caching)
