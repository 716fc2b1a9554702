"""The network from one stage on: fed the activation that enters that stage, it computes what the whole model
would. A phase whose frozen stages form a prefix trains this suffix on cached prefix outputs."""

from __future__ import annotations

import torch
from torch import nn

from finetune.config.catalog import STAGES, Stage
from finetune.models.families import family_for
from finetune.models.stages import StageMap


class _Reached(Exception):
    """Raised by the hook that captures a stage's input, so the rest of the forward is not computed."""


def suffix_names(stages: StageMap, first: Stage) -> list[str]:
    """Top-level module names of the stages from `first` up to (not including) the head, in forward order."""
    return [name for stage in STAGES[STAGES.index(first) : -1] for name, _ in stages.modules[stage]]


@torch.no_grad()
def stage_input(model: nn.Module, module: str, images: torch.Tensor) -> torch.Tensor:
    """The input the module named `module` receives for `images`; the forward stops there."""
    captured: list[torch.Tensor] = []

    def capture(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _Reached

    handle = model.get_submodule(module).register_forward_pre_hook(capture)
    try:
        model(images)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]


class SuffixNet(nn.Module):
    """`model` from the modules `names` on, on (N, C*H*W) activations of shape `shape` (same parameters, no copy)."""

    def __init__(self, model: nn.Module, names: list[str], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.shape = shape
        self.pool_and_classify = family_for(model).forward_head  # as the family computes them

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        x = activations.view(activations.size(0), *self.shape).float()
        for name in self.names:
            x = self.model.get_submodule(name)(x)
        return self.pool_and_classify(self.model, x)
