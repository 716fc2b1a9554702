"""Named stages (stem, layer1..layer4, head) of a ResNet, and the freeze + BatchNorm policy applied to them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from finetune.config.catalog import STAGES, BnPolicy, Stage
from finetune.errors import ModelError

# Module-name patterns per stage, in the spirit of timm's `group_matcher`. timm's ResNet and torchvision's
# share names (conv1, bn1, layerN, fc); timm's pre-activation ResNetV2 uses stem / stages.N / norm (the final
# pre-activation BN) / head.
_RESNET_PATTERNS = {
    "stem": r"^(conv1|bn1|act1|relu|maxpool)(\.|$)",
    "layer1": r"^layer1(\.|$)",
    "layer2": r"^layer2(\.|$)",
    "layer3": r"^layer3(\.|$)",
    "layer4": r"^layer4(\.|$)",
}
_RESNETV2_PATTERNS = {
    "stem": r"^stem(\.|$)",
    "layer1": r"^stages\.0(\.|$)",
    "layer2": r"^stages\.1(\.|$)",
    "layer3": r"^stages\.2(\.|$)",
    "layer4": r"^(stages\.3|norm)(\.|$)",
}
_POOLING = r"^(global_pool|avgpool|head\.global_pool|head\.flatten|head\.drop)(\.|$)"


def _patterns(model: nn.Module, classifier: str) -> dict[str, str]:
    base = _RESNETV2_PATTERNS if hasattr(model, "stages") else _RESNET_PATTERNS
    return {**base, "head": rf"^{re.escape(classifier)}(\.|$)"}


def _stage_of(name: str, patterns: dict[str, str]) -> Stage | None:
    return next((s for s in STAGES if re.match(patterns[s], name)), None)


@dataclass(frozen=True)
class StageMap:
    """Which stage every tensor and top-level module of one model belongs to; computed once per model."""

    of_tensor: dict[str, Stage]  # every parameter and buffer name
    modules: dict[Stage, list[tuple[str, nn.Module]]]  # top-level modules of each stage, in forward order

    @classmethod
    def of(cls, model: nn.Module, classifier: str) -> StageMap:
        """Map `model`; an unmapped tensor is an error, not a silent miss."""
        patterns = _patterns(model, classifier)
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
            stage = _stage_of(name, patterns) if name and not re.match(_POOLING, name) else None
            if stage and not any(name.startswith(prev + ".") for prev, _ in modules[stage]):
                modules[stage].append((name, module))
        return cls(of_tensor=of_tensor, modules=modules)

    def parameters(self, model: nn.Module, stage: Stage) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if self.of_tensor[n] == stage]


@dataclass(frozen=True)
class FreezePlan:
    """Which stages train, and whether BatchNorm in frozen stages keeps its statistics fixed."""

    trainable: tuple[Stage, ...]
    bn: BnPolicy = "frozen"

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
    """The last residual block of a stage (layer4's is Grad-CAM's usual target) for timm, torchvision and ResNetV2."""
    _, module = stages.modules[stage][0]
    blocks = getattr(module, "blocks", module)  # timm's ResNetV2 stage keeps its blocks in .blocks
    children = list(blocks.children())
    return children[-1] if children else module
