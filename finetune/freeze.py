"""Named stages (stem, layer1..layer4, head) and the freeze + BatchNorm policy applied to them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from finetune.errors import ModelError
from finetune.recipe import STAGES

# Module-name patterns per stage. timm's ResNet and torchvision's share names (conv1, bn1, layerN, fc);
# timm's pre-activation ResNetV2 uses stem / stages.N / norm (the final pre-activation BN) / head.
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


def stage_of_names(model: nn.Module, classifier: str) -> dict[str, str]:
    """Map every parameter and buffer name to its stage; an unmapped tensor is an error, not a silent miss."""
    patterns = _patterns(model, classifier)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    mapping = {}
    for name in names:
        stage = next((s for s, pattern in patterns.items() if re.match(pattern, name)), None)
        if stage is None:
            raise ModelError(f"tensor '{name}' of {type(model).__name__} belongs to no stage; this architecture is not supported for freezing")
        mapping[name] = stage
    return mapping


def stage_modules(model: nn.Module, classifier: str) -> dict[str, list[tuple[str, nn.Module]]]:
    """Top-level modules of each stage, in forward order (pooling and activations belong to none)."""
    patterns = _patterns(model, classifier)
    grouped: dict[str, list[tuple[str, nn.Module]]] = {s: [] for s in STAGES}
    for name, module in model.named_modules():
        if not name or re.match(_POOLING, name):
            continue
        stage = next((s for s, pattern in patterns.items() if re.match(pattern, name)), None)
        parent_matched = stage and any(name.startswith(prev + ".") for prev, _ in grouped[stage])
        if stage and not parent_matched:
            grouped[stage].append((name, module))
    return grouped


@dataclass(frozen=True)
class FreezePlan:
    """Which stages train, and whether BatchNorm in frozen stages keeps its statistics fixed."""

    trainable: tuple[str, ...]
    bn: str = "frozen"

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if s not in self.trainable)


def _batchnorms(modules: Iterable[nn.Module]) -> Iterable[nn.modules.batchnorm._NormBase]:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase):
                yield sub


def apply_freeze(model: nn.Module, plan: FreezePlan, *, classifier: str) -> int:
    """Set requires_grad per stage; returns the number of trainable parameters."""
    mapping = stage_of_names(model, classifier)
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(mapping[name] in plan.trainable)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def set_train_mode(model: nn.Module, plan: FreezePlan, *, classifier: str) -> None:
    """`model.train()`, then BatchNorm of frozen stages back to eval when the policy is 'frozen'.

    Called at the start of every training epoch: a bare `model.train()` would let frozen BN layers
    update their running statistics (the classic "frozen but not frozen" bug).
    """
    model.train()
    if plan.bn != "frozen":
        return
    groups = stage_modules(model, classifier)
    for stage in plan.frozen:
        for bn in _batchnorms(module for _, module in groups[stage]):
            bn.eval()
