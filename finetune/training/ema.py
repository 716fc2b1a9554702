"""Weight EMA for finetune's phases: timm's ModelEmaV3, averaging only the tensors that move in the current phase.

Frozen stages (and BatchNorm statistics that stay fixed) are copied from the model when a phase starts and never
averaged, so "frozen means frozen" holds for the averaged weights too, and a head-only phase costs a head-sized
update per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from finetune.config.train_schema import EmaConfig
from finetune.models.stages import FreezePlan, StageMap


def moving_tensors(model: nn.Module, plan: FreezePlan, stages: StageMap) -> set[str]:
    """State-dict names that change during a phase: its trainable parameters and the BatchNorm buffers that update."""
    moving_stages = set(plan.trainable) if plan.bn == "frozen" else set(stages.of_tensor.values())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names | {n for n, _ in model.named_buffers() if stages.of_tensor[n] in moving_stages}


class StageEma:
    """timm's ModelEmaV3 whose update touches only `moving` tensors; `updates` counts optimizer steps for the warmup.

    It holds the ModelEmaV3 rather than being one: as a training add-on its `state_dict()` is what `last.pt` keeps
    for an exact resume (the averaged weights and the step count), which an `nn.Module`'s own would not be.
    """

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        self.average = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup)
        self.updates = 0
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model."""
        return self.average.module

    def get_decay(self, step: int) -> float:
        return float(self.average.get_decay(step))

    def start_phase(self, model: nn.Module, moving: Iterable[str]) -> None:
        """Copy every tensor that stays still this phase from `model`, and remember the pairs that move."""
        moving = set(moving)
        ema_state, model_state = self.module.state_dict(), model.state_dict()
        with torch.no_grad():
            for name, value in model_state.items():
                if name not in moving:
                    ema_state[name].copy_(value)
        self._pairs = [(ema_state[n], model_state[n]) for n in model_state if n in moving]

    @torch.no_grad()
    def step(self) -> None:
        """Fold the model's current moving tensors into the average (after each optimizer step)."""
        self.updates += 1
        decay = self.get_decay(self.updates)
        floats = [(e, m) for e, m in self._pairs if e.is_floating_point()]
        for ema_v, model_v in self._pairs:
            if not ema_v.is_floating_point():
                ema_v.copy_(model_v)  # BatchNorm's num_batches_tracked
        if floats:
            self.average._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], weight=1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """What `last.pt` keeps for an exact resume."""
        return {"updates": self.updates, "state_dict": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["state_dict"])
