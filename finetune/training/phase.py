"""What every phase-like pass sets up first (training's phases and lr-find): the freeze plan applied, the optimizer
over what trains, and whether a lone last batch must be dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.config.schema import PhaseConfig, TrainConfig
from finetune.models.build import ModelBundle
from finetune.models.stages import FreezePlan, apply_freeze, batchnorm_trains
from finetune.training.optim import build_optimizer


@dataclass
class PhaseSetup:
    plan: FreezePlan
    trainable: int  # parameters that train
    optimizer: torch.optim.Optimizer
    lone_batch_fails: bool  # BatchNorm normalises with batch statistics: a batch of one cannot train


def set_up_phase(bundle: ModelBundle, config: PhaseConfig, train: TrainConfig) -> PhaseSetup:
    """Freeze per the phase, then build its optimizer (layer-wise rates) over the model as it now is."""
    plan = FreezePlan(trainable=config.trainable_stages(), bn=config.norm)
    trainable = apply_freeze(bundle.model, plan, bundle.stages)
    optimizer = build_optimizer(bundle.model, config, train, bundle.stages)
    return PhaseSetup(plan=plan, trainable=trainable, optimizer=optimizer, lone_batch_fails=batchnorm_trains(plan, bundle.stages))
