"""Named stages (stem, layer1..layer4, head) of a backbone, and the freeze + BatchNorm policy applied to them.

Which module belongs to which stage is the backbone family's to say (finetune/models/families.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from finetune.config.catalog import STAGES, NormPolicy, Stage
from finetune.errors import ModelError
from finetune.models.families import Family, Normalisation, family_for, normalisation_of


def _stage_of(name: str, patterns: dict[Stage, str]) -> Stage | None:
    return next((s for s in STAGES if re.match(patterns[s], name)), None)


@dataclass(frozen=True)
class StageMap:
    """Which stage every tensor and top-level module of one model belongs to; computed once per model."""

    of_tensor: dict[str, Stage]  # every parameter and buffer name
    modules: dict[Stage, list[tuple[str, nn.Module]]]  # top-level modules of each stage, in forward order
    family: Family  # the backbone family whose patterns made this map
    normalisation: Normalisation  # what its normalisation layers are (BatchNorm when it has any)

    @classmethod
    def of(cls, model: nn.Module, classifier: str) -> StageMap:
        """Map `model` by its family's patterns; an unmapped tensor is an error, not a silent miss."""
        family = family_for(model)
        patterns = family.patterns(model, classifier)
        of_tensor: dict[str, Stage] = {}
        for name in [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]:
            stage = _stage_of(name, patterns)
            if stage is None:
                raise ModelError(
                    f"tensor '{name}' of {type(model).__name__} belongs to no stage; this architecture is not supported for freezing"
                )
            of_tensor[name] = stage
        modules: dict[Stage, list[tuple[str, nn.Module]]] = {s: [] for s in STAGES}
        for name, module in model.named_modules():
            stage = _stage_of(name, patterns) if name and not re.match(family.pooling, name) else None
            if stage and not any(name.startswith(prev + ".") for prev, _ in modules[stage]):
                modules[stage].append((name, module))
        return cls(
            of_tensor=of_tensor, modules=modules, family=family, normalisation=normalisation_of(model, family.normalisation)
        )

    def parameters(self, model: nn.Module, stage: Stage) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if self.of_tensor[n] == stage]


@dataclass(frozen=True)
class FreezePlan:
    """Which stages train, and whether BatchNorm in frozen stages keeps its statistics fixed (the recipe's `norm:`;
    parameters of frozen stages, BatchNorm's, LayerNorm's and GroupNorm's affine ones included, never train)."""

    trainable: tuple[Stage, ...]
    bn: NormPolicy = "frozen"

    @property
    def frozen(self) -> tuple[Stage, ...]:
        return tuple(s for s in STAGES if s not in self.trainable)


def _batchnorms(modules: Iterable[nn.Module]) -> Iterator[nn.modules.batchnorm._NormBase]:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase):
                yield sub


def batchnorm_trains(plan: FreezePlan, stages: StageMap) -> bool:
    """Whether a BatchNorm layer normalises with batch statistics in this plan (then a batch of one cannot train)."""
    moving = plan.trainable if plan.bn == "frozen" else STAGES
    return any(True for stage in moving for _ in _batchnorms(module for _, module in stages.modules[stage]))


def apply_freeze(model: nn.Module, plan: FreezePlan, stages: StageMap) -> int:
    """Set requires_grad per stage; returns the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(stages.of_tensor[name] in plan.trainable)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def set_train_mode(model: nn.Module, plan: FreezePlan, stages: StageMap) -> None:
    """`model.train()`, then BatchNorm of frozen stages back to eval when the policy is 'frozen'.

    Called at the start of every training epoch: a bare `model.train()` would let frozen BN layers
    update their running statistics (the classic "frozen but not frozen" bug).
    """
    model.train()
    if plan.bn != "frozen":
        return
    for stage in plan.frozen:
        for bn in _batchnorms(module for _, module in stages.modules[stage]):
            bn.eval()


def last_block(stages: StageMap, stage: Stage = "layer4") -> nn.Module:
    """The block Grad-CAM hooks in a stage (its last; layer4's is the usual target), as the model's family says."""
    return stages.family.cam_target([module for _, module in stages.modules[stage]])
