"""Self-contained checkpoints: weights plus everything eval/predict need, in one format, written atomically."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config.loading import recipe_from_dict
from finetune.config.schema import Recipe
from finetune.data.transforms import ImageConfig
from finetune.errors import CheckpointError
from finetune.files import atomic_write, disk_error
from finetune.models.build import ModelBundle, build_model
from finetune.versions import library_versions

FORMAT = "finetune-checkpoint"
FORMAT_VERSION = 2  # 2: training_state holds EarlyStopping's state and timm schedule updates (finetune 0.2)
RESUMABLE_FROM = 2
VALIDATION_KEYS = (
    "val_logits",
    "val_targets",
)  # best.pt's own validation outputs (calibration, the val report)  # older checkpoints still evaluate and predict; their training state is not resumed


def make_payload(
    *,
    bundle: ModelBundle,
    class_names: list[str],
    image: ImageConfig,
    recipe: Recipe,
    extra: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Only tensors and plain types, so `torch.load(..., weights_only=True)` reads it. `weights` replace the
    model's own (the EMA's, when best.pt keeps the averaged weights)."""
    state = weights if weights is not None else bundle.model.state_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "model_name": bundle.name,
        "classifier": bundle.classifier,
        "class_names": list(class_names),
        "image": image.to_dict(),
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        **(extra or {}),
    }


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Written atomically (temporary file, fsync, rename): a kill leaves the old file intact."""
    atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a finetune checkpoint (weights_only: no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; was the run trained to the end of an epoch?")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unpickling error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a finetune checkpoint; to start from plain weights use model.pretrained: {path}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer finetune (format {payload['format_version']}); upgrade finetune")
    return payload


@dataclass
class CheckpointSaver:
    """Writes best.pt, last.pt and phase_best.pt of one run, all in the one checkpoint format (rank 0 only)."""

    bundle: ModelBundle
    class_names: list[str]
    image: ImageConfig
    recipe: Recipe
    enabled: bool = True  # False on torchrun ranks other than 0

    def save(
        self,
        path: Path,
        *,
        epoch: int,
        metrics: dict[str, float],
        training_state: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if not self.enabled:
            return
        extra: dict[str, Any] = {"epoch": epoch, "metrics": metrics, **(outputs or {})}
        if training_state is not None:
            extra["training_state"] = training_state
        payload = make_payload(
            bundle=self.bundle, class_names=self.class_names, image=self.image, recipe=self.recipe, extra=extra, weights=weights
        )
        try:
            save_checkpoint(payload, path)
        except OSError as exc:
            raise disk_error(path, exc, resume=path.parent.parent) from None

    def copy(self, source: Path, target: Path) -> None:
        """`target` becomes a copy of the checkpoint just written to `source` (no second serialisation)."""
        if not self.enabled:
            return
        try:
            with open(source, "rb") as handle:
                atomic_write(target, lambda out: shutil.copyfileobj(handle, out))
        except OSError as exc:
            raise disk_error(target, exc, resume=target.parent.parent) from None


@dataclass
class LoadedModel:
    bundle: ModelBundle
    class_names: list[str]
    image: ImageConfig
    recipe: Recipe
    meta: dict[str, Any]  # everything in the checkpoint but the weights and the validation outputs
    temperature: float = 1.0  # fitted on the validation split after training (1: none)
    validation: tuple[np.ndarray, np.ndarray] | None = None  # (logits, targets) of the best epoch on the val split


def _fit_error(exc: RuntimeError, recipe: Recipe, classes: int) -> CheckpointError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = (lines[1] if len(lines) > 1 else lines[0])[:200]
    return CheckpointError(
        f"checkpoint weights do not fit {recipe.model.name} with {classes} classes: {detail}; "
        "the checkpoint was edited or saved for another model or class count"
    )


def checkpoint_meta(payload: dict[str, Any]) -> dict[str, Any]:
    """Everything in a checkpoint but the weights, the training state and the validation outputs."""
    return {k: v for k, v in payload.items() if k not in ("state_dict", "training_state", *VALIDATION_KEYS)}


def model_from_checkpoint(payload: dict[str, Any]) -> LoadedModel:
    """Rebuild the exact model (architecture, head, weights) a checkpoint was saved from."""
    recipe = recipe_from_dict(payload["recipe"], source="stored in checkpoint")
    class_names = [str(name) for name in payload["class_names"]]
    bundle = build_model(recipe.model, num_classes=len(class_names), load_pretrained=False)
    try:
        bundle.model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise _fit_error(exc, recipe, len(class_names)) from None
    bundle.model.eval()
    meta = checkpoint_meta(payload)
    image = ImageConfig.from_dict(payload["image"])
    validation = None
    if all(key in payload for key in VALIDATION_KEYS):
        validation = (payload["val_logits"].numpy(), payload["val_targets"].numpy())
    return LoadedModel(
        bundle=bundle,
        class_names=class_names,
        image=image,
        recipe=recipe,
        meta=meta,
        temperature=float(payload.get("temperature", 1.0)),
        validation=validation,
    )
