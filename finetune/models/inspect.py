"""`finetune inspect`: parameters, trainability and forward FLOPs per named stage (counted by torch, on the meta device)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from finetune.config.catalog import STAGES
from finetune.config.loading import model_config_for
from finetune.config.schema import Recipe
from finetune.errors import UsageError
from finetune.models.build import build_model
from finetune.models.families import normalisation_note

# He et al. 2016, Table 1: multiply-adds at 224 px for the ImageNet ResNets.
PAPER_GFLOPS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}
PAPER_NOTE = (
    "Gap: today's ResNet-50/101/152 are 'v1.5' (stride 2 on the 3x3 conv of each downsampling bottleneck, "
    "the paper puts it on the first 1x1), so that 1x1 and the 3x3 run on 4x more positions: +0.2-0.3 G."
)
MIN_INPUT, MAX_INPUT = 16, 4096  # as transforms.input_size (up to 2048) allows, with room to inspect larger
MODULE_DEPTH = 4  # FLOPs are kept per module down to e.g. "ResNetV2.stages.0": the stage modules
BOTTLENECK_PAPER_MODELS = ("resnet50", "resnet101", "resnet152")


@dataclass
class StageInfo:
    stage: str
    modules: list[str]
    params: int
    gmacs: float
    trainable: list[bool] = field(default_factory=list)  # one entry per phase
    bn: list[str] = field(default_factory=list)  # per phase: 'train', or the recipe's norm: policy for a frozen stage


@dataclass
class Inspection:
    model: str
    input_size: int
    num_classes: int
    stages: list[StageInfo]
    total_params: int
    total_gmacs: float
    paper_gflops: float | None
    family: str = ""  # the backbone family
    normalisation: str = ""  # its normalisation layers and what norm: means for them
    batchnorm: bool = True  # whether its norm: policy has statistics to keep fixed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "paper_note": self.paper_note}

    @property
    def paper_note(self) -> str | None:
        return PAPER_NOTE if self.model.removeprefix("tv:") in BOTTLENECK_PAPER_MODELS else None


def inspect_model(
    *, name: str, recipe: Recipe | None = None, input_size: int | None = None, num_classes: int = 1000
) -> Inspection:
    """Count per-stage parameters and multiply-accumulates (torch's FlopCounterMode / 2) of one forward pass."""
    if input_size is not None and not MIN_INPUT <= input_size <= MAX_INPUT:
        raise UsageError(f"--input-size {input_size}: give the image size in pixels, from {MIN_INPUT} to {MAX_INPUT}")
    model_cfg = model_config_for(name, base=recipe.model if recipe else None)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        bundle = build_model(model_cfg, num_classes=num_classes, load_pretrained=False)
    size = input_size or (
        recipe.transforms.input_size if recipe and recipe.transforms.input_size else int(bundle.data_config["input_size"][-1])
    )
    model = bundle.model.eval()
    counter = FlopCounterMode(display=False, depth=MODULE_DEPTH)
    with counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    phases = recipe.train.resolved_phases() if recipe else []
    stages = []
    for stage in STAGES:
        names = [n for n, _ in bundle.stages.modules[stage]]
        flops = sum(sum(counts.get(f"{prefix}.{n}", {}).values()) for n in names)
        params = sum(p.numel() for _, p in bundle.stages.parameters(model, stage))
        stages.append(
            StageInfo(
                stage=stage,
                modules=names,
                params=params,
                gmacs=flops / 2e9,
                trainable=[stage in phase.trainable_stages() for phase in phases],
                bn=[("train" if stage in phase.trainable_stages() else phase.norm) for phase in phases],
            )
        )
    return Inspection(
        model=name,
        input_size=size,
        num_classes=num_classes,
        stages=stages,
        total_params=sum(p.numel() for p in model.parameters()),
        total_gmacs=counter.get_total_flops() / 2e9,
        paper_gflops=PAPER_GFLOPS.get(name.removeprefix("tv:")),
        family=bundle.stages.family.name,
        normalisation=normalisation_note(bundle.stages.normalisation),
        batchnorm=bundle.stages.normalisation == "batchnorm",
    )


def format_inspection(info: Inspection) -> str:
    """A plain-text table for the terminal."""
    phases = len(info.stages[0].trainable)
    header = (
        f"{'stage':<8} {'params':>12} {'GMACs':>8}"
        + "".join(f"  {'phase ' + str(i + 1):>14}" for i in range(phases))
        + "  modules"
    )
    lines = [
        f"{info.model} at {info.input_size}x{info.input_size}, {info.num_classes} classes; {info.family} family",
        f"normalisation: {info.normalisation}",
        header,
        "-" * len(header),
    ]
    for s in info.stages:
        cells = "".join(
            f"  {('train' if t else 'frozen') + ('' if t or not info.batchnorm else ' bn:' + b):>14}"
            for t, b in zip(s.trainable, s.bn)
        )
        lines.append(f"{s.stage:<8} {s.params:>12,} {s.gmacs:>8.3f}{cells}  {', '.join(s.modules)}")
    lines.append(f"{'total':<8} {info.total_params:>12,} {info.total_gmacs:>8.3f}")
    if info.paper_gflops is not None:
        lines.append(f"He et al. 2016, Table 1: {info.paper_gflops} G multiply-adds (measured here: {info.total_gmacs:.2f}).")
        lines += [info.paper_note] if info.paper_note else []
    return "\n".join(lines)
