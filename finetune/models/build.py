"""Build a backbone (timm, or torchvision with `tv:`), load its weights, and fit the head to the classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torchvision
from torch import nn

from finetune.config.catalog import TV_PREFIX
from finetune.config.schema import HeadConfig, ModelConfig
from finetune.errors import ModelError
from finetune.models.families import Family, family_of
from finetune.models.stages import StageMap
from finetune.models.weights import hub_state_dict, load_weights, read_state_dict

# torchvision's ResNet weights were trained with these (see torchvision.models.ResNet50_Weights.transforms).
TV_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 224 / 256,
}


@dataclass
class ModelBundle:
    """A model plus what the data pipeline, the freeze policy and checkpoints need to know about it."""

    model: nn.Module
    name: str
    classifier: str  # dotted module path of the classification head
    data_config: dict[str, Any]  # timm-style: input_size, mean, std, interpolation, crop_pct
    stages: StageMap  # computed once, after the head and stem are final

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.classifier)


def _create(name: str, family: Family) -> tuple[nn.Module, dict[str, Any]]:
    if name.startswith(TV_PREFIX):
        return torchvision.models.get_model(name[len(TV_PREFIX) :], weights=None), dict(TV_DATA_CONFIG)
    model = timm.create_model(name, pretrained=False, **dict(family.create_kwargs))
    return model, timm.data.resolve_model_data_config(model)


def build_head(in_features: int, num_classes: int, cfg: HeadConfig, *, conv: bool = False) -> nn.Module:
    """A linear classifier, or flatten -> dropout -> [hidden -> ReLU -> dropout] -> linear."""
    if cfg.hidden is None and cfg.dropout == 0.0:
        return nn.Conv2d(in_features, num_classes, 1) if conv else nn.Linear(in_features, num_classes)
    layers: list[nn.Module] = [nn.Flatten(1), nn.Dropout(cfg.dropout)]
    if cfg.hidden is not None:
        layers += [nn.Linear(in_features, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)]
        in_features = cfg.hidden
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _replace_head(model: nn.Module, classifier: str, num_classes: int, cfg: HeadConfig) -> None:
    old = model.get_submodule(classifier)
    if isinstance(old, nn.Linear):
        in_features, conv = old.in_features, False
    elif isinstance(old, nn.Conv2d):  # timm ResNetV2 classifies with a 1x1 conv
        in_features, conv = old.in_channels, True
    elif isinstance(old, nn.Identity) and hasattr(model, "num_features"):  # a timm encoder made without a classifier
        timm_model: Any = model
        in_features, conv = int(getattr(timm_model, "head_hidden_size", None) or timm_model.num_features), False
    else:
        raise ModelError(f"cannot replace classifier '{classifier}' of type {type(old).__name__}")
    parent_name, _, attr = classifier.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, build_head(in_features, num_classes, cfg, conv=conv))


def build_model(cfg: ModelConfig, *, num_classes: int, load_pretrained: bool = True) -> ModelBundle:
    """Create the architecture, load weights per `cfg.pretrained`, and put a `num_classes` head on it."""
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes, got {num_classes}")
    family = family_of(cfg.name)
    model, data_config = _create(cfg.name, family)
    classifier = family.classifier(model)
    if load_pretrained and cfg.pretrained is True:
        load_weights(model, hub_state_dict(cfg.name), classifier=classifier, source=f"hub weights of {cfg.name}")
    _replace_head(model, classifier, num_classes, cfg.head)
    if load_pretrained and isinstance(cfg.pretrained, Path):  # a head of matching shape (same classes) is kept
        load_weights(model, read_state_dict(cfg.pretrained), classifier=classifier, source=str(cfg.pretrained))
    if cfg.small_input:  # after loading: the pretrained 7x7 stem conv is replaced, the rest is kept
        family.make_small_input(model, cfg.name)
    return ModelBundle(
        model=model, name=cfg.name, classifier=classifier, data_config=data_config, stages=StageMap.of(model, classifier)
    )
