"""Build a ResNet (timm, or torchvision with `tv:`), load its weights, and fit the head to the classes."""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

from finetune.errors import ModelError, WeightsError
from finetune.recipe import HeadConfig, ModelConfig

log = logging.getLogger(__name__)

TV_PREFIX = "tv:"
_TV_FAMILY = ("resnet", "wide_resnet", "resnext")
# torchvision's ResNet weights were trained with these (see torchvision.models.ResNet50_Weights.transforms).
_TV_DATA_CONFIG = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 224 / 256}


@dataclass
class ModelBundle:
    """A model plus what the data pipeline and checkpoints need to know about it."""

    model: nn.Module
    name: str
    classifier: str  # dotted module path of the classification head
    data_config: dict[str, Any]  # timm-style: input_size, mean, std, interpolation, crop_pct


@functools.lru_cache(maxsize=1)
def known_model_names() -> tuple[str, ...]:
    """ResNet-family names accepted in `model.name` (timm names, and torchvision ones with `tv:`)."""
    timm_names = timm.list_models(module=["resnet", "resnetv2"])
    tv_names = [
        TV_PREFIX + n
        for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(_TV_FAMILY)
    ]
    return tuple(sorted(timm_names) + sorted(tv_names))


def _create(name: str) -> tuple[nn.Module, str, dict[str, Any]]:
    if name.startswith(TV_PREFIX):
        model = torchvision.models.get_model(name[len(TV_PREFIX):], weights=None)
        return model, "fc", dict(_TV_DATA_CONFIG)
    model = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_model_data_config(model)
    return model, model.pretrained_cfg.get("classifier", "fc"), config


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_source(name: str) -> tuple[str, str]:
    """(download URL, file name) of the default pretrained weights for `name`."""
    if name.startswith(TV_PREFIX):
        weights = torchvision.models.get_model_weights(name[len(TV_PREFIX):]).DEFAULT
        return weights.url, Path(urlparse(weights.url).path).name
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f"timm has no pretrained weights for '{name}'; set model.pretrained: false or a local file")
    if cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors", "model.safetensors"
    return cfg.url, Path(urlparse(cfg.url).path).name


def _cached_hub_file(name: str) -> Path | None:
    """The hub download already in the local cache, if any (so offline machines reuse it)."""
    if name.startswith(TV_PREFIX):
        _, filename = _hub_source(name)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    found = try_to_load_from_cache(cfg.hf_hub_id, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Pretrained weights through timm's / torchvision's own download code; fails fast when offline."""
    url, filename = _hub_source(name)
    cached = _cached_hub_file(name)
    if cached is not None:
        log.info("using cached pretrained weights %s", cached)
        return read_state_dict(cached)
    if not _host_reachable(url):
        raise WeightsError(
            f"cannot reach {urlparse(url).hostname} to download pretrained weights for {name}; "
            f"download {url} on a connected machine, copy it here and set model.pretrained: /path/to/{filename} "
            f"(or --set model.pretrained=/path/to/{filename})"
        )
    try:
        if name.startswith(TV_PREFIX):
            weights = torchvision.models.get_model_weights(name[len(TV_PREFIX):]).DEFAULT
            return weights.get_state_dict(progress=True)
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:  # network and hub errors come in many types
        raise WeightsError(f"downloading {url} failed ({exc}); fetch it by hand and set model.pretrained: /path/to/{filename}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (plain, {'state_dict': ...}, {'model': ...} or a finetune checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; fix model.pretrained")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/unpickling errors vary by torch version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path} cannot be loaded safely with torch.load(weights_only=True): {first}; "
            "save a plain state dict (torch.save(model.state_dict(), file)) or use .safetensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state dict of tensors; save model.state_dict() instead")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, classifier: str, source: str) -> None:
    """Load backbone weights strictly; classifier tensors are kept only when their shapes match."""
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    head_prefix = classifier + "."
    is_head = lambda key: key.startswith(head_prefix)  # noqa: E731
    missing = [k for k in own if not is_head(k) and k not in state]
    unexpected = [k for k in state if not is_head(k) and k not in own]
    if missing or unexpected:
        raise WeightsError(
            f"weights {source} do not fit this architecture: {len(missing)} missing key(s) (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); is the file for another model than model.name?"
        )
    wrong = [k for k in own if not is_head(k) and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise WeightsError(f"weights {source}: shape mismatch for {wrong[0]} {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}; is it another model variant?")
    keep = {k: v for k, v in state.items() if not is_head(k) or (k in own and v.shape == own[k].shape)}
    dropped_head = any(is_head(k) for k in state) and not any(is_head(k) for k in keep)
    model.load_state_dict(keep, strict=False)
    log.info("loaded weights from %s%s", source, " (classifier re-initialised for the new classes)" if dropped_head else "")


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
    else:
        raise ModelError(f"cannot replace classifier '{classifier}' of type {type(old).__name__}")
    parent_name, _, attr = classifier.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, build_head(in_features, num_classes, cfg, conv=conv))


def _small_input_stem(model: nn.Module, name: str) -> None:
    """CIFAR-style stem: 3x3 stride-1 conv and no max-pool, so 32-64 px images keep their resolution."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ModelError(f"model.small_input needs a single-conv stem (resnet18..152, wide/resnext, tv:*); {name} has another stem")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_model(cfg: ModelConfig, *, num_classes: int, load_pretrained: bool = True) -> ModelBundle:
    """Create the architecture, load weights per `cfg.pretrained`, and put a `num_classes` head on it."""
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes, got {num_classes}")
    model, classifier, data_config = _create(cfg.name)
    if load_pretrained and cfg.pretrained is True:
        load_weights(model, _hub_state_dict(cfg.name), classifier=classifier, source=f"hub weights of {cfg.name}")
    _replace_head(model, classifier, num_classes, cfg.head)
    if load_pretrained and isinstance(cfg.pretrained, Path):  # a head of matching shape (same classes) is kept
        load_weights(model, read_state_dict(cfg.pretrained), classifier=classifier, source=str(cfg.pretrained))
    if cfg.small_input:  # after loading: the pretrained 7x7 stem conv is replaced, the rest is kept
        _small_input_stem(model, cfg.name)
    return ModelBundle(model=model, name=cfg.name, classifier=classifier, data_config=data_config)
