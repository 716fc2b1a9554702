"""Pretrained weights: the hub (timm / torchvision download code, failing fast offline) or a local file."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.models import clean_state_dict
from torch import nn

from finetune.config.catalog import TV_PREFIX
from finetune.errors import WeightsError, load_failure

log = logging.getLogger(__name__)
WRAPPER_PREFIXES = ("model.", "backbone.", "encoder.")  # besides DDP's module. (timm's clean_state_dict strips that)
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_source(name: str) -> tuple[str, str]:
    """(download URL, file name) of the default pretrained weights for `name`."""
    if name.startswith(TV_PREFIX):
        weights = torchvision.models.get_model_weights(name[len(TV_PREFIX) :]).DEFAULT
        return weights.url, Path(urlparse(weights.url).path).name
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f"timm has no pretrained weights for '{name}'; set model.pretrained: false or a local file")
    if cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors", "model.safetensors"
    if not cfg.url:
        raise WeightsError(f"timm names no download for '{name}'; set model.pretrained: false or a local file")
    url = str(cfg.url)
    return url, Path(urlparse(url).path).name


def _cached_hub_file(name: str) -> Path | None:
    """The hub download already in the local cache, if any (so offline machines reuse it)."""
    if name.startswith(TV_PREFIX):
        _, filename = hub_source(name)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    found = try_to_load_from_cache(cfg.hf_hub_id, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


def check_hub_reachable(name: str) -> Path | None:
    """The cached hub file for `name`, or None when the hub answers; raises at once when neither (offline).

    Called before any slow work, so an offline user learns which file to fetch in seconds.
    """
    url, filename = hub_source(name)
    cached = _cached_hub_file(name)
    if cached is not None:
        return cached
    if not _host_reachable(url):
        raise WeightsError(
            f"cannot reach {urlparse(url).hostname} to download pretrained weights for {name}; "
            f"download {url} on a connected machine, copy it here and set model.pretrained: /path/to/{filename} "
            f"(or --set model.pretrained=/path/to/{filename})"
        )
    return None


def hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Pretrained weights through timm's / torchvision's own download code; fails fast when offline."""
    cached = check_hub_reachable(name)
    if cached is not None:
        log.info("using cached pretrained weights %s", cached)
        return read_state_dict(cached)
    url, filename = hub_source(name)
    try:
        if name.startswith(TV_PREFIX):
            weights = torchvision.models.get_model_weights(name[len(TV_PREFIX) :]).DEFAULT
            return weights.get_state_dict(progress=True)
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:  # network and hub errors come in many types
        raise WeightsError(
            f"downloading {url} failed ({exc}); fetch it by hand and set model.pretrained: /path/to/{filename}"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (plain, {'state_dict': ...}, {'model': ...} or a finetune checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; fix model.pretrained")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes): an interrupted download or copy? Fetch it again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/unpickling errors vary by torch version
        raise WeightsError(
            f"{path} cannot be loaded safely with torch.load(weights_only=True): {load_failure(exc)}; "
            "save a plain state dict (torch.save(model.state_dict(), file)) or use .safetensors"
        ) from None
    for key in STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state dict of tensors; save model.state_dict() instead")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    state = clean_state_dict(state)
    for prefix in WRAPPER_PREFIXES:
        if not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _examples(keys: list[str]) -> str:
    """' (e.g. a, b)' for a non-empty list of state-dict keys, else nothing."""
    return f" (e.g. {', '.join(keys[:2])})" if keys else ""


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, classifier: str, source: str) -> None:
    """Load backbone weights strictly; classifier tensors are kept only when their shapes match."""
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    head_prefix = classifier + "."

    def is_head(key: str) -> bool:
        return key.startswith(head_prefix)

    missing = [k for k in own if not is_head(k) and k not in state]
    unexpected = [k for k in state if not is_head(k) and k not in own]
    if missing or unexpected:
        raise WeightsError(
            f"weights {source} do not fit this architecture: {len(missing)} missing key(s){_examples(missing)}, "
            f"{len(unexpected)} unexpected{_examples(unexpected)}; is the file for another model than model.name?"
        )
    wrong = [k for k in own if not is_head(k) and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise WeightsError(
            f"weights {source}: shape mismatch for {wrong[0]} {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}; "
            "is it another model variant?"
        )
    keep = {k: v for k, v in state.items() if not is_head(k) or (k in own and v.shape == own[k].shape)}
    dropped_head = any(is_head(k) for k in state) and not any(is_head(k) for k in keep)
    model.load_state_dict(keep, strict=False)
    log.info("loaded weights from %s%s", source, " (classifier re-initialised for the new classes)" if dropped_head else "")
