"""Optimizer and learning-rate schedule for one phase, built with timm's factories over finetune's stage groups."""

from __future__ import annotations

from typing import Any

import timm.optim
import timm.scheduler
import torch
from torch import nn

from finetune.config.catalog import STAGES, Stage
from finetune.config.schema import PhaseConfig, TrainConfig
from finetune.errors import RecipeError
from finetune.models.stages import StageMap

FUSED_OPTIMIZERS = ("adamw", "sgd", "momentum")  # timm names backed by torch optimizers that have fused kernels


def stage_lr_multipliers(phase: PhaseConfig) -> dict[Stage, float]:
    """Per-stage LR factor: layer-wise decay (head 1, layer4 d, layer3 d^2, ...) times explicit lr_mult."""
    depth = {stage: len(STAGES) - 1 - i for i, stage in enumerate(STAGES)}
    decay = phase.layer_decay or 1.0
    return {stage: decay ** depth[stage] * phase.lr_mult.get(stage, 1.0) for stage in STAGES}


def stage_param_groups(model: nn.Module, phase: PhaseConfig, cfg: TrainConfig, stages: StageMap) -> list[dict[str, Any]]:
    """One group per (trainable stage, decay / no-decay); biases, norm weights and what the model exempts (timm's
    `no_weight_decay()`: a ViT's position embedding and class token) get no weight decay.

    A group's LR factor is timm's `lr_scale`, which timm's schedulers multiply into every rate they set.
    (timm's own layer-decay groups decay per residual block; a recipe's `layer_decay` is per stage.)
    """
    mults = stage_lr_multipliers(phase)
    timm_model: Any = model
    # timm's own exemptions beside biases and norms: a ViT's position embedding and class token
    exempt = set(timm_model.no_weight_decay()) if hasattr(timm_model, "no_weight_decay") else set()
    groups = []
    for stage in phase.trainable_stages():
        params = [(n, p) for n, p in stages.parameters(model, stage) if p.requires_grad]
        decayed = [p for n, p in params if p.ndim > 1 and n not in exempt]
        for decay, chosen in ((True, decayed), (False, [p for n, p in params if p.ndim <= 1 or n in exempt])):
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr_scale": mults[stage],
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "stage": stage,
                    }
                )
    return groups


def build_optimizer(model: nn.Module, phase: PhaseConfig, cfg: TrainConfig, stages: StageMap) -> torch.optim.Optimizer:
    """timm's `create_optimizer_v2` over the stage groups (sgd is Nesterov SGD, as in timm and torchvision's references)."""
    groups = stage_param_groups(model, phase, cfg, stages)
    if not groups:
        raise RecipeError(f"phase trains {list(phase.trainable_stages())} but they hold no parameters; train at least 'head'")
    name = "momentum" if cfg.optimizer == "sgd" and cfg.momentum == 0 else cfg.optimizer  # Nesterov needs momentum
    # torch's fused AdamW/SGD kernels: same update, one kernel for all tensors (6.8x faster steps on CPU, BENCHMARKS.md)
    extra: dict[str, Any] = {"fused": True} if name in FUSED_OPTIMIZERS else {}
    return timm.optim.create_optimizer_v2(
        groups, opt=name, lr=phase.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra
    )


def stage_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each stage's parameter groups (the ones timm's scheduler set for this step)."""
    return {group["stage"]: float(group["lr"]) for group in optimizer.param_groups}


class Schedule:
    """Per-step rates from a timm scheduler, stepped like torch's: the rate for the next step is set after each step.

    timm counts updates from 1 with a linear warmup from `warmup_lr_init`; warming up over w + 1 updates from 0
    and asking for update s + 1 before step s gives step s the factor (s + 1) / (w + 1), then the schedule from 1.
    """

    def __init__(self, scheduler: timm.scheduler.scheduler.Scheduler) -> None:
        self.scheduler = scheduler
        self.updates = 0
        self._apply()

    def _apply(self) -> None:
        self.scheduler.step_update(self.updates + 1)

    def step(self) -> None:
        self.updates += 1
        self._apply()

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Called after each epoch's validation; per-step schedules have nothing to do."""

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self._apply()


class PlateauSchedule(Schedule):
    """Warmup per step (timm), then torch's ReduceLROnPlateau on the early-stopping metric after each epoch.

    timm's own PlateauLRScheduler is deprecated and does not checkpoint its counters; torch's saves them all,
    so a resumed run decays at the same epochs.
    """

    def __init__(self, scheduler: timm.scheduler.scheduler.Scheduler, *, warmup_steps: int, plateau: Any, metric: str) -> None:
        self.warmup_steps = warmup_steps
        self.plateau = plateau
        self.metric = metric
        super().__init__(scheduler)

    def _apply(self) -> None:
        if self.updates <= self.warmup_steps:  # afterwards the plateau rule alone sets the rates
            super()._apply()

    def end_epoch(self, metrics: dict[str, float]) -> None:
        if self.updates >= self.warmup_steps:
            self.plateau.step(metrics[self.metric])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state["plateau"])
        super().load_state_dict(state)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, total_steps: int, steps_per_epoch: int, metric: str = "val_accuracy"
) -> Schedule:
    """Linear warmup, then cosine decay to 0, constant, step decay (per step) or decay on plateau (per epoch) of
    `metric` (the early-stopping metric the run follows)."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    common: dict[str, Any] = {"warmup_t": warmup + 1, "warmup_lr_init": 0.0, "warmup_prefix": True, "t_in_epochs": False}
    if cfg.scheduler in ("constant", "plateau"):
        scheduler: timm.scheduler.scheduler.Scheduler = timm.scheduler.StepLRScheduler(
            optimizer, decay_t=1, decay_rate=1.0, **common
        )
    elif cfg.scheduler == "step":
        decay_t = max(1, int(round(cfg.decay_epochs * steps_per_epoch)))
        scheduler = timm.scheduler.StepLRScheduler(optimizer, decay_t=decay_t, decay_rate=cfg.decay_rate, **common)
    else:
        # cycle_decay acts only on cycles after the first, which cycle_limit=1 never reaches; != 1 it keeps timm from
        # warning that a one-step cosine "has no effect" (it has none to have).
        scheduler = timm.scheduler.CosineLRScheduler(
            optimizer, t_initial=max(1, total_steps - warmup), lr_min=0.0, cycle_limit=1, cycle_decay=0.5, **common
        )
    if cfg.scheduler != "plateau":
        return Schedule(scheduler)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min" if metric == "val_loss" else "max", factor=cfg.decay_rate, patience=cfg.patience_epochs
    )
    return PlateauSchedule(scheduler, warmup_steps=warmup, plateau=plateau, metric=metric)
