"""Backbone families: how each names its stem, stages and head, and the few things finetune does to it by hand.

One `Family` per entry; the stage map, the small-input stem, the suffix's head and Grad-CAM's layer read it, so a
new family is one entry here (and its names in `config.catalog.FAMILY_NAMES`), not an `if` in every module.
For timm models the stage patterns come from timm's own `group_matcher` and `feature_info`; a family timm does
not describe (torchvision's) spells them out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import timm
import torch
from torch import nn

from finetune.config.catalog import FAMILY_NAMES, TV_PREFIX, FamilyNames, NormPolicy, Stage, family_listing
from finetune.errors import ModelError
from finetune.models.adapters import (
    SMALL_INPUT_REFUSED,
    SmallInputStem,
    avgpool_fc_head,
    fc_classifier,
    last_child,
    last_of_blocks,
    last_of_sequences,
    last_token_mixer,
    refused_small_input,
    single_conv_stem,
    stride_one_stem,
    timm_classifier,
    timm_forward_head,
    tokens_to_map,
)
from finetune.models.stage_patterns import (
    StagePatterns,
    anchored,
    even_block_patterns,
    fixed_stage_patterns,
    timm_stage_patterns,
)

Normalisation = Literal["batchnorm", "groupnorm", "layernorm"]
NORMALISATION_NAMES: Mapping[Normalisation, str] = MappingProxyType(
    {"batchnorm": "BatchNorm", "groupnorm": "GroupNorm", "layernorm": "LayerNorm"}
)


def normalisation_of(model: nn.Module, rule: Normalisation) -> Normalisation:
    """What `model`'s normalisation layers are: BatchNorm when it has any (their statistics are what `norm:` is
    about), else GroupNorm or LayerNorm; `rule` (its family's) when it has none of them."""
    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds):
        return "batchnorm"
    if any(issubclass(k, nn.GroupNorm) for k in kinds):
        return "groupnorm"
    return "layernorm" if any(issubclass(k, nn.LayerNorm) for k in kinds) else rule


def normalisation_note(kind: Normalisation) -> str:
    """What the recipe's `norm:` policy means for normalisation layers of this kind."""
    name = NORMALISATION_NAMES[kind]
    if kind == "batchnorm":
        return f"{name}: norm: frozen keeps the running statistics of frozen stages fixed, norm: train updates them"
    return f"{name}: no running statistics; frozen stages keep their affine parameters fixed, whatever norm: says"


def policy_note(kind: Normalisation, policy: NormPolicy) -> str:
    """What `norm: policy` does to frozen stages of this kind, in a few words for the training log."""
    name = NORMALISATION_NAMES[kind]
    if kind == "batchnorm":
        return f"{name} statistics of frozen stages {'fixed' if policy == 'frozen' else 'update'}"
    return f"{name}, no statistics" + ("" if policy == "frozen" else ": norm: train changes nothing")


@dataclass(frozen=True)
class Family:
    """How one backbone family names its stem, stages and head, and how finetune adapts it."""

    name: str
    names: FamilyNames  # the model names it covers: config.catalog.FAMILY_NAMES[name]
    classes: tuple[str, ...]  # dotted names of its model classes: how a built model is recognised
    stage_patterns: StagePatterns  # stem, layer1..layer4 (module/tensor name regexes)
    pooling: str  # modules that pool layer4's output for the head stage: no stage runs them (forward_head does)
    classifier: Callable[[nn.Module], str]  # dotted path of the classification layer the head replaces
    forward_head: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # pooling + classifier on layer4's output
    cam_target: Callable[[Sequence[nn.Module]], nn.Module]  # of a stage's modules, the one Grad-CAM hooks
    small_input_stem: SmallInputStem | None  # CIFAR-style stem in place (or a refusal that says why); None: not offered
    normalisation: Normalisation = "batchnorm"  # as a rule; a model's own layers decide (*_gn, BiT: GroupNorm)
    # Modules that run, in order, between the pooling and the classifier (ConvNeXt's head.norm, MobileNetV3's 1x1
    # conv_head): with the classifier they make the head stage, and a head-only phase caches the first one's input.
    head_chain: tuple[str, ...] = ()
    cam_reshape: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # tokens -> (N, C, h, w) map
    create_kwargs: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model arguments (a ViT's dynamic_img_size)

    @property
    def describe(self) -> str:
        """'name (what it covers)', for error messages."""
        return self.names.describe(self.name)

    def head_modules(self, classifier: str) -> list[str]:
        """The head stage's modules in forward order: the head chain, then the classifier."""
        return [*self.head_chain, classifier]

    def patterns(self, model: nn.Module, classifier: str) -> dict[Stage, str]:
        """Name patterns of all six stages of `model`, whose classifier is `classifier`."""
        head = anchored([re.escape(name) for name in self.head_modules(classifier)])
        return {**self.stage_patterns(model), "head": head}

    def covers(self, model_name: str) -> bool:
        """Whether `model_name` (a timm name, or `tv:` + a torchvision one) belongs to this family."""
        if model_name.startswith(TV_PREFIX):
            return model_name[len(TV_PREFIX) :].startswith(self.names.tv_prefixes)
        if not self.names.timm_modules or self.names.excludes(model_name):
            return False
        return timm.models.is_model_in_modules(model_name, self.names.timm_modules)

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


def regnet_stage_patterns(model: nn.Module) -> dict[Stage, str]:
    """RegNet's from timm's grouping, with `final_conv` (a 1x1 conv in some variants) after s4 in layer4."""
    return timm_stage_patterns(model, layer4_extra=[r"final_conv"])


def vit_stage_patterns(model: nn.Module) -> dict[Stage, str]:
    """A ViT's blocks in four equal groups; timm puts the final `norm` with the last block, and the tensors of the
    attention pooling of `global_pool='map'` models, which pools the tokens layer4 made, join it there."""
    return even_block_patterns(model, layer4_extra=[r"attn_pool"])


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
    Family(
        name="convnext",
        names=FAMILY_NAMES["convnext"],
        classes=("timm.models.convnext.ConvNeXt",),
        stage_patterns=timm_stage_patterns,
        pooling=r"^head\.global_pool(\.|$)",
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_of_blocks,
        small_input_stem=refused_small_input("its stem is a 4 x 4 stride-4 patchify conv, which a 3 x 3 conv cannot replace"),
        normalisation="layernorm",
        head_chain=("head.norm", "head.flatten", "head.pre_logits", "head.drop"),
    ),
    Family(
        name="efficientnet",
        names=FAMILY_NAMES["efficientnet"],
        classes=("timm.models.efficientnet.EfficientNet",),
        stage_patterns=timm_stage_patterns,
        pooling=r"^global_pool(\.|$)",
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_of_sequences,
        small_input_stem=stride_one_stem("conv_stem"),
    ),
    Family(
        name="mobilenetv3",
        names=FAMILY_NAMES["mobilenetv3"],
        classes=("timm.models.mobilenetv3.MobileNetV3",),
        stage_patterns=timm_stage_patterns,
        pooling=r"^global_pool(\.|$)",
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_of_sequences,
        small_input_stem=stride_one_stem("conv_stem"),
        head_chain=("conv_head", "norm_head", "act2", "flatten"),  # the 1x1 conv runs on the pooled features
    ),
    Family(
        name="regnet",
        names=FAMILY_NAMES["regnet"],
        classes=("timm.models.regnet.RegNet",),
        stage_patterns=regnet_stage_patterns,
        pooling=r"^head\.(global_pool|drop|flatten)(\.|$)",
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_child,
        small_input_stem=stride_one_stem("stem.conv"),
    ),
    Family(
        name="vit",
        names=FAMILY_NAMES["vit"],
        classes=("timm.models.vision_transformer.VisionTransformer",),
        stage_patterns=vit_stage_patterns,
        pooling=r"^attn_pool(\.|$)",  # the class token is taken (or tokens averaged) without a module, but 'map'
        # models pool with attention: forward_head runs it, its tensors train with layer4
        classifier=timm_classifier,
        forward_head=timm_forward_head,
        cam_target=last_token_mixer,
        small_input_stem=refused_small_input(
            "a ViT takes transforms.input_size as it is (its position embeddings are resized to the patch grid)"
        ),
        normalisation="layernorm",
        head_chain=("fc_norm", "head_drop"),
        cam_reshape=tokens_to_map,
        create_kwargs=(("dynamic_img_size", True),),  # any input size: position embeddings resized per forward
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


def family_of(model_name: str) -> Family:
    """The family a model name belongs to; a clear error for a name no family covers."""
    found = next((family for family in families().values() if family.covers(model_name)), None)
    if found is None:
        raise ModelError(f"model '{model_name}' belongs to no backbone family; finetune knows: {family_listing()}")
    return found


def family_for(model: nn.Module) -> Family:
    """The family of a built model, by its class; a clear error for a model no family builds."""
    found = next((family for family in families().values() if family.builds(model)), None)
    if found is None:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise ModelError(f"model class {kind} belongs to no backbone family; finetune knows: {family_listing()}")
    return found
