"""The run's model as a plain timm model in the folder layout of the Hugging Face Hub (timm's `save_for_hf`):
`model.safetensors` and `config.json` (architecture, num_classes, label_names, pretrained_cfg with the run's image
contract), so that `timm.create_model("hf-hub:USER/REPO")` or `("local-dir:DIR")` rebuilds it with no finetune.

Only what timm can build by name is written: a `tv:` ResNet becomes timm's ResNet of the same name (the same
state-dict keys), a dropout-only head becomes timm's plain classifier (dropout does nothing at inference); a hidden
head layer or a small-input stem are no timm architecture, and are refused with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch
from PIL import Image
from timm.models._hub import save_for_hf
from torch import nn

from finetune.config.catalog import TV_PREFIX
from finetune.config.schema import ModelConfig
from finetune.data.decode import load_image
from finetune.data.limits import fit_for_resize
from finetune.data.transforms import DEFAULT_CROP_PCT
from finetune.errors import ModelError
from finetune.inference.checkpoint import TrainedModel
from finetune.inference.task import Task
from finetune.models.families import family_of

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# the source weights' provenance in timm's pretrained_cfg: not true of weights finetune trained
PROVENANCE_KEYS = frozenset(
    {"tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "license", "origin_url", "paper_ids", "paper_name"}
    | {"notes", "description", "state_dict", "label_names", "label_descriptions"}
)


def timm_name(model_name: str) -> str:
    """The timm architecture that builds `model_name`: itself, or for `tv:resnet50` timm's `resnet50`."""
    return model_name[len(TV_PREFIX) :] if model_name.startswith(TV_PREFIX) else model_name


def check_timm_architecture(model: ModelConfig) -> None:
    """ModelError, saying why, when the run's model is no plain timm architecture."""
    why = None
    if model.small_input:
        why = "its small-input stem (a 3 x 3 stride-1 conv, no max-pool) is no timm architecture"
    elif model.head.hidden is not None:
        why = f"its head has a hidden layer (model.head.hidden: {model.head.hidden}), which timm's plain classifier has not"
    elif not timm.is_model(timm_name(model.name)):
        why = f"timm has no architecture named {timm_name(model.name)}"
    if why is not None:
        raise ModelError(
            f"cannot write {model.name} as a timm model for the Hub: {why}; export --format onnx instead, "
            "or train without it for a timm folder"
        )


def _plain_head(state: dict[str, torch.Tensor], classifier: str, target: nn.Module) -> dict[str, torch.Tensor]:
    """A flatten -> dropout -> linear head (finetune's head with dropout only) as timm's plain classifier: the linear
    layer's tensors under the classifier's own name, reshaped to it (timm's ResNetV2 classifies with a 1x1 conv)."""
    prefix = classifier + "."
    inner = sorted({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    if not inner or not all(part.isdigit() for part in inner):
        return state
    last = prefix + max(inner, key=int) + "."
    head = target.get_submodule(classifier)
    kept = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for param in ("weight", "bias"):
        kept[prefix + param] = state[last + param].reshape(getattr(head, param).shape)
    return kept


def timm_model(loaded: TrainedModel) -> nn.Module:
    """A fresh timm model by name, with the run's weights in it, in eval mode; ModelError when the run's model is
    not a plain timm model (why, and what to train instead)."""
    name = loaded.recipe.model.name
    check_timm_architecture(loaded.recipe.model)
    kwargs = dict(family_of(name).create_kwargs)
    target = timm.create_model(timm_name(name), pretrained=False, num_classes=len(loaded.class_names), **kwargs)
    state = _plain_head(loaded.bundle.model.state_dict(), loaded.bundle.classifier, target)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))[:200]
        raise ModelError(
            f"cannot write {name} as timm's {timm_name(name)} for the Hub: the weights do not fit ({first})"
        ) from None
    return target.eval()


def data_config(loaded: TrainedModel) -> dict[str, Any]:
    """The run's eval preprocessing in timm's words (what `timm.data.resolve_data_config` reads back)."""
    image = loaded.image
    return {
        "input_size": (3, image.input_size, image.input_size),
        "mean": tuple(image.mean),
        "std": tuple(image.std),
        "interpolation": image.interpolation,
        "crop_pct": image.crop_pct,
        "crop_mode": "center",
    }


def write_timm_folder(loaded: TrainedModel, folder: Path, *, extra: dict[str, Any]) -> nn.Module:
    """model.safetensors and config.json into `folder`; `extra` goes into config.json under "finetune" (temperature,
    task: what timm does not know). Returns the timm model written."""
    model = timm_model(loaded)
    timm_net: Any = model  # pretrained_cfg: a plain dict attribute of timm's models
    timm_net.pretrained_cfg = {k: v for k, v in timm_net.pretrained_cfg.items() if k not in PROVENANCE_KEYS}
    save_for_hf(
        model,
        str(folder),
        model_config={"label_names": list(loaded.class_names), "finetune": extra},
        safe_serialization=True,
        data_config=data_config(loaded),
    )
    return model


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG).read_text(encoding="utf-8"))


def load_timm_folder(folder: Path) -> nn.Module:
    """The folder as timm loads it from the Hub: `timm.create_model("local-dir:FOLDER", pretrained=True)`."""
    return timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()


@torch.inference_mode()
def timm_probabilities(model: nn.Module, paths: list[str], *, temperature: float, task: Task) -> np.ndarray:
    """Probabilities as a timm user gets them: timm's eval transform from the model's pretrained_cfg, the logits
    divided by the run's temperature. Images are decoded by finetune (EXIF orientation applied, 16-bit scaled to 8
    bits, which Pillow's convert('RGB') would clip), so what differs is timm's resize and crop alone."""
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config)
    crop = int(config["input_size"][-1])
    short_side = math.floor(crop / float(config.get("crop_pct") or DEFAULT_CROP_PCT))  # a thin image: its kept part only
    scale = torch.tensor(float(temperature))
    out = []
    for start in range(0, len(paths), 32):
        images = [
            Image.fromarray(fit_for_resize(load_image(p), short_side=short_side, crop=crop)) for p in paths[start : start + 32]
        ]
        batch = torch.stack([transform(image) for image in images])
        out.append(task.probabilities(model(batch), scale).numpy())
    return np.concatenate(out)
