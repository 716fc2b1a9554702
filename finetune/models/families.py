"""Backbone families: how each names its stem, stages and head, and the few things finetune does to it by hand.

One `Family` per entry; the stage map, the small-input stem, the suffix's head and Grad-CAM's layer read it, so a
new family is one entry here (and its names in `config.catalog.FAMILY_NAMES`), not an `if` in every module.
For timm models the stage patterns come from timm's own `group_matcher` and `feature_info`; a family timm does
not describe (torchvision's) spells them out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import timm
import torch
from torch import nn

from finetune.config.catalog import FAMILY_NAMES, TV_PREFIX, FamilyNames, Stage
from finetune.errors import ModelError

Normalisation = Literal["batchnorm", "groupnorm", "layernorm"]
LAYERS: tuple[Stage, ...] = ("layer1", "layer2", "layer3", "layer4")
# timm's MATCH_PREV_GROUP (timm/models/_manipulate.py): a group_matcher pattern that joins the last block's group,
# such as ResNetV2's final pre-activation `norm`.
_WITH_LAST_BLOCK = (99999,)


def _anchored(patterns: Iterable[str]) -> str:
    """One pattern for a module or tensor name that starts with any of `patterns` and ends there or at a dot."""
    return "^(?:" + "|".join(f"(?:{p})" for p in patterns) + r")(?:\.|$)"


def _split_matcher(value: Any) -> tuple[list[str], list[str]]:
    """(own patterns, patterns that join the last block) of one `group_matcher` entry: a regex, or (regex, group) pairs."""
    if isinstance(value, str):
        return [value], []
    own = [pattern for pattern, group in value if group != _WITH_LAST_BLOCK]
    return own, [pattern for pattern, group in value if group == _WITH_LAST_BLOCK]


def timm_stage_patterns(model: nn.Module) -> dict[Stage, str]:
    """stem and layer1..layer4 from timm's own grouping of `model`.

    `group_matcher(coarse=True)` names the stem, and which `feature_info` taps are stages (the four, in order, are
    layer1..layer4); taps before the first stage (ResNet's `act1`) belong to the stem; what timm groups with the
    last block (ResNetV2's final `norm`, in either matcher) belongs to layer4.
    """
    timm_model: Any = model  # group_matcher and feature_info are timm's, not nn.Module's
    coarse = timm_model.group_matcher(coarse=True)
    stem, _ = _split_matcher(coarse["stem"])
    blocks, after = _split_matcher(coarse["blocks"])
    _, fine_after = _split_matcher(timm_model.group_matcher(coarse=False)["blocks"])
    taps = [str(info["module"]) for info in timm_model.feature_info]
    stages = [tap for tap in taps if any(re.match(p, tap) for p in blocks)]
    if len(stages) != len(LAYERS):
        raise ModelError(
            f"{type(model).__name__} has {len(stages)} stages in timm's feature_info ({', '.join(stages)}); "
            f"finetune names exactly {len(LAYERS)} ({', '.join(LAYERS)}): give its family explicit stage patterns"
        )
    patterns: dict[Stage, str] = {"stem": _anchored(stem + [re.escape(t) for t in taps[: taps.index(stages[0])]])}
    patterns.update({layer: _anchored([re.escape(stage)]) for layer, stage in zip(LAYERS, stages)})
    patterns["layer4"] = _anchored([re.escape(stages[-1]), *dict.fromkeys(after + fine_after)])
    return patterns


def fixed_stage_patterns(patterns: Mapping[Stage, str]) -> Callable[[nn.Module], dict[Stage, str]]:
    """Stage patterns spelled out, for a family timm does not describe."""
    return lambda model: dict(patterns)


def timm_classifier(model: nn.Module) -> str:
    """The classifier's dotted path, as the model's pretrained config names it ('fc', 'head.fc', ...)."""
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
    return str(pretrained_cfg.get("classifier", "fc"))


def timm_forward_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooling and classifier on the last stage's output: timm's own `forward_head`."""
    timm_model: Any = model
    return timm_model.forward_head(x)


def avgpool_fc_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's head: avgpool, flatten, fc."""
    pooled = torch.flatten(model.get_submodule("avgpool")(x), 1)
    return model.get_submodule("fc")(pooled)


def fc_classifier(model: nn.Module) -> str:
    """torchvision ResNet's classifier."""
    return "fc"


def last_child(stage: nn.Module) -> nn.Module:
    """The last block of a stage that is a sequence of blocks (ResNet's layerN)."""
    children = list(stage.children())
    return children[-1] if children else stage


def last_of_blocks(stage: nn.Module) -> nn.Module:
    """The last block of a stage that keeps its blocks in `.blocks` (ResNetV2, ConvNeXt)."""
    return last_child(stage.get_submodule("blocks"))


SMALL_INPUT_REFUSED = "model.small_input needs a single-conv stem (resnet18..152, wide/resnext, tv:*); {name} has another stem"


def single_conv_stem(model: nn.Module, name: str) -> None:
    """CIFAR-style stem: 3x3 stride-1 conv and no max-pool, so 32-64 px images keep their resolution."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ModelError(SMALL_INPUT_REFUSED.format(name=name))
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


@dataclass(frozen=True)
class Family:
    """How one backbone family names its stem, stages and head, and how finetune adapts it."""

    name: str
    names: FamilyNames  # the model names it covers: config.catalog.FAMILY_NAMES[name]
    classes: tuple[str, ...]  # dotted names of its model classes: how a built model is recognised
    stage_patterns: Callable[[nn.Module], dict[Stage, str]]  # stem, layer1..layer4 (module/tensor name regexes)
    pooling: str  # modules between layer4 and the classifier, in no stage (they hold no tensors)
    classifier: Callable[[nn.Module], str]  # dotted path of the classification layer the head replaces
    forward_head: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # pooling + classifier on layer4's output
    cam_target: Callable[[nn.Module], nn.Module]  # in a stage module, the block Grad-CAM hooks (its last one)
    small_input_stem: Callable[[nn.Module, str], None] | None  # CIFAR-style stem in place; None: not offered
    normalisation: Normalisation = "batchnorm"  # what its layers use as a rule (variants may differ: *_gn, BiT)
    head: str | None = None  # head stage pattern when it holds more than the classifier; None: the classifier

    @property
    def describe(self) -> str:
        """'name (what it covers)', for error messages."""
        covered = [f"timm {m}" for m in self.names.timm_modules] + [f"{TV_PREFIX}{p}*" for p in self.names.tv_prefixes]
        return f"{self.name} ({', '.join(covered)})"

    def patterns(self, model: nn.Module, classifier: str) -> dict[Stage, str]:
        """Name patterns of all six stages of `model`, whose classifier is `classifier`."""
        return {**self.stage_patterns(model), "head": self.head or _anchored([re.escape(classifier)])}

    def covers(self, model_name: str) -> bool:
        """Whether `model_name` (a timm name, or `tv:` + a torchvision one) belongs to this family."""
        if model_name.startswith(TV_PREFIX):
            return model_name[len(TV_PREFIX) :].startswith(self.names.tv_prefixes)
        return bool(self.names.timm_modules) and timm.models.is_model_in_modules(model_name, self.names.timm_modules)

    def builds(self, model: nn.Module) -> bool:
        """Whether `model` is an instance of one of this family's classes."""
        return f"{type(model).__module__}.{type(model).__qualname__}" in self.classes

    def make_small_input(self, model: nn.Module, name: str) -> None:
        """Replace the stem of `model` (named `name`) by the family's small-input stem, or refuse."""
        if self.small_input_stem is None:
            raise ModelError(SMALL_INPUT_REFUSED.format(name=name))
        self.small_input_stem(model, name)


_TV_RESNET_STAGES: dict[Stage, str] = {
    "stem": r"^(conv1|bn1|relu|maxpool)(\.|$)",
    "layer1": r"^layer1(\.|$)",
    "layer2": r"^layer2(\.|$)",
    "layer3": r"^layer3(\.|$)",
    "layer4": r"^layer4(\.|$)",
}

FAMILIES: tuple[Family, ...] = (
    Family(
        name="resnet",
        names=FAMILY_NAMES["resnet"],
        classes=("timm.models.resnet.ResNet",),
        stage_patterns=timm_stage_patterns,
        pooling=r"^global_pool(\.|$)",
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_child,
        small_input_stem=single_conv_stem,
    ),
    Family(
        name="resnetv2",
        names=FAMILY_NAMES["resnetv2"],
        classes=("timm.models.resnetv2.ResNetV2",),
        stage_patterns=timm_stage_patterns,
        pooling=r"^head\.(global_pool|flatten|drop)(\.|$)",
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_of_blocks,
        small_input_stem=None,  # a stem module (conv, pad, pool), not conv1 + maxpool
    ),
    Family(
        name="tv_resnet",
        names=FAMILY_NAMES["tv_resnet"],
        classes=("torchvision.models.resnet.ResNet",),
        stage_patterns=fixed_stage_patterns(_TV_RESNET_STAGES),
        pooling=r"^avgpool(\.|$)",
        classifier=fc_classifier,
        forward_head=avgpool_fc_head,
        cam_target=last_child,
        small_input_stem=single_conv_stem,
    ),
)


def make_registry(families: Iterable[Family]) -> Mapping[str, Family]:
    """Families by name; raises when two share a name, a timm module, a torchvision prefix or a class."""
    registry: dict[str, Family] = {}
    claimed: dict[str, str] = {}
    for family in families:
        if family.name in registry:
            raise ModelError(f"backbone family '{family.name}' is registered twice; give each family one entry")
        keys = [f"timm module '{m}'" for m in family.names.timm_modules]
        keys += [f"torchvision prefix '{p}'" for p in family.names.tv_prefixes]
        keys += [f"class {c}" for c in family.classes]
        for key in keys:
            if key in claimed:
                raise ModelError(f"backbone families '{claimed[key]}' and '{family.name}' both claim {key}")
            claimed[key] = family.name
        registry[family.name] = family
    return MappingProxyType(registry)


@functools.cache
def families() -> Mapping[str, Family]:
    """The registered families by name, checked against the model names the catalog lists for them."""
    registry = make_registry(FAMILIES)
    if set(registry) != set(FAMILY_NAMES) or any(registry[n].names != FAMILY_NAMES[n] for n in registry):
        raise ModelError(
            f"backbone families {sorted(registry)} do not match config.catalog.FAMILY_NAMES {sorted(FAMILY_NAMES)}; "
            "a family is one entry in each"
        )
    return registry


def _listing() -> str:
    return "; ".join(family.describe for family in families().values())


def family_of(model_name: str) -> Family:
    """The family a model name belongs to; a clear error for a name no family covers."""
    found = next((family for family in families().values() if family.covers(model_name)), None)
    if found is None:
        raise ModelError(f"model '{model_name}' belongs to no backbone family; finetune knows: {_listing()}")
    return found


def family_for(model: nn.Module) -> Family:
    """The family of a built model, by its class; a clear error for a model no family builds."""
    found = next((family for family in families().values() if family.builds(model)), None)
    if found is None:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise ModelError(f"model class {kind} belongs to no backbone family; finetune knows: {_listing()}")
    return found
