"""The few things finetune does to a backbone family by hand, as small functions the family table names: where
the classifier is, pooling + classifier on the last stage's output, which block Grad-CAM hooks (and how a ViT's
tokens become a map), and the small-input stems."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from finetune.errors import ModelError

SmallInputStem = Callable[[nn.Module, str], None]
SMALL_INPUT_REFUSED = (
    "model.small_input needs a single-conv stem (resnet18..152, wide/resnext, tv:*, efficientnet, mobilenetv3/v4, "
    "regnet); {name} has another stem"
)


def timm_classifier(model: nn.Module) -> str:
    """The classifier's dotted path, as the model's pretrained config names it ('fc', 'head.fc', ...)."""
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
    return str(pretrained_cfg.get("classifier", "fc"))


def fc_classifier(model: nn.Module) -> str:
    """torchvision ResNet's classifier."""
    return "fc"


def timm_forward_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooling and classifier on the last stage's output: timm's own `forward_head`."""
    timm_model: Any = model
    return timm_model.forward_head(x)


def avgpool_fc_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's head: avgpool, flatten, fc."""
    pooled = torch.flatten(model.get_submodule("avgpool")(x), 1)
    return model.get_submodule("fc")(pooled)


# Grad-CAM targets: given a stage's top-level modules in forward order, the module whose output is the heatmap's map.


def _last(module: nn.Module) -> nn.Module:
    children = list(module.children())
    return children[-1] if children else module


def last_child(modules: Sequence[nn.Module]) -> nn.Module:
    """The last block of a stage that is a sequence of blocks (ResNet's layerN, RegNet's sN)."""
    return _last(modules[0])


def last_of_blocks(modules: Sequence[nn.Module]) -> nn.Module:
    """The last block of a stage that keeps its blocks in `.blocks` (ResNetV2, ConvNeXt)."""
    return _last(modules[0].get_submodule("blocks"))


def last_of_sequences(modules: Sequence[nn.Module]) -> nn.Module:
    """The last block of the last block sequence of a stage that may fold several (EfficientNet's, MobileNet's
    blocks.N), not the 1x1 conv and norm after them."""
    return _last([m for m in modules if isinstance(m, nn.Sequential)][-1])


def last_token_mixer(modules: Sequence[nn.Module]) -> nn.Module:
    """A transformer stage's last block's first norm: its output still carries every token's gradient (the final
    norm's patch tokens get none when the class token alone is classified)."""
    blocks = [m for m in modules if isinstance(getattr(m, "norm1", None), nn.Module)]
    return blocks[-1].get_submodule("norm1") if blocks else modules[-1]  # parallel-branch blocks: the last module


def tokens_to_map(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, prefix + h*w, C) ViT tokens as an (N, C, h, w) map, the prefix (class, register tokens) left out."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    patches = tokens[:, prefix:]
    side = math.isqrt(patches.size(1))
    if side * side != patches.size(1):
        raise ModelError(f"{patches.size(1)} patch tokens do not form a square map; Grad-CAM needs a square input")
    return patches.reshape(patches.size(0), side, side, patches.size(2)).permute(0, 3, 1, 2)


# Small-input stems: in place, after the weights are loaded.


def single_conv_stem(model: nn.Module, name: str) -> None:
    """CIFAR-style stem: 3x3 stride-1 conv and no max-pool, so 32-64 px images keep their resolution."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ModelError(SMALL_INPUT_REFUSED.format(name=name))
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def stride_one_stem(conv_path: str) -> SmallInputStem:
    """A stem whose one 3x3 stride-2 conv at `conv_path` keeps its (pretrained) kernel at stride 1, so 32-64 px
    images lose one halving less (EfficientNet's, MobileNet's and RegNet's stems have no pooling to drop)."""

    def make(model: nn.Module, name: str) -> None:
        conv = model.get_submodule(conv_path)
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
            raise ModelError(SMALL_INPUT_REFUSED.format(name=name))
        conv.stride, conv.padding = (1, 1), (1, 1)
        if type(conv) is not nn.Conv2d:  # timm's Conv2dSame (tf_* models) pads for its stride itself: a plain conv now
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
            plain.load_state_dict(conv.state_dict())
            parent, _, attr = conv_path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, plain)

    return make


def refused_small_input(reason: str) -> SmallInputStem:
    """No small-input stem for this family, and why (shown with the model's name)."""

    def refuse(model: nn.Module, name: str) -> None:
        raise ModelError(f"model.small_input is not offered for {name}: {reason}; set model.small_input: false")

    return refuse
