"""The checkpoint format, read and written in one place: weights plus everything eval/predict need, as a typed record.

`load_trained` is the one loader of a trained model: a run folder (its best.pt) or a checkpoint file in, the
exact model that was saved (architecture, head, weights, eval mode) and its `CheckpointRecord` out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config.loading import recipe_from_dict
from finetune.config.schema import Recipe
from finetune.data.split import multi_hot
from finetune.data.transforms import ImageConfig
from finetune.errors import CheckpointError, DataError, RunDirError, load_failure
from finetune.files import atomic_write, guarded
from finetune.inference.task import DEFAULT_TASK, Task, task_named
from finetune.models.build import ModelBundle, build_model
from finetune.run_dir import RunDir
from finetune.versions import library_versions

FORMAT = "finetune-checkpoint"
FORMAT_VERSION = 2  # 2: training_state holds EarlyStopping's state and timm schedule updates (finetune 0.2)
RESUMABLE_FROM = 2  # older checkpoints still evaluate and predict; their training state is not resumed
VALIDATION_KEYS = ("val_logits", "val_targets")  # best.pt's own validation outputs (calibration, the val report)


def make_payload(
    *,
    bundle: ModelBundle,
    class_names: list[str],
    image: ImageConfig,
    recipe: Recipe,
    extra: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    task: str = DEFAULT_TASK,
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
        "task": task,
        "image": image.to_dict(),
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        **(extra or {}),
    }


def save_checkpoint(payload: dict[str, Any], path: Path, *, resume: Path | None = None) -> None:
    """Written atomically (temporary file, fsync, rename): a kill leaves the old file intact. A write the OS refuses
    (torch's zip writer says so with a RuntimeError) is `disk_error`'s one line; `resume` is the run it continues."""
    with guarded(Path(path), resume=resume, atomic=True):
        atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a finetune checkpoint as stored (weights_only: no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; was the run trained to the end of an epoch?")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unpickling error types
        raise CheckpointError(f"{path} is not a readable checkpoint: {load_failure(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a finetune checkpoint; to start from plain weights use model.pretrained: {path}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer finetune (format {payload['format_version']}); upgrade finetune")
    return payload


def checkpoint_meta(payload: dict[str, Any]) -> dict[str, Any]:
    """Everything in a checkpoint but the weights, the training state and the validation outputs."""
    return {k: v for k, v in payload.items() if k not in ("state_dict", "training_state", *VALIDATION_KEYS)}


@dataclass
class CheckpointRecord:
    """What a checkpoint says besides its weights, typed: read the fields, not the payload's keys."""

    class_names: list[str]
    task: Task
    image: ImageConfig
    recipe: Recipe
    temperature: float = 1.0  # fitted on the validation split after training (1: none)
    validation: tuple[np.ndarray, np.ndarray] | None = None  # (logits, targets) of the best epoch on the val split
    epoch: int | None = None
    finished: bool | None = None  # None: the checkpoint keeps no training state (best.pt)
    meta: dict[str, Any] = field(default_factory=dict)  # the stored entries but weights and outputs (the report's context)

    @classmethod
    def of(cls, payload: dict[str, Any]) -> CheckpointRecord:
        validation = None
        if all(key in payload for key in VALIDATION_KEYS):
            validation = (payload["val_logits"].numpy(), payload["val_targets"].numpy())
        state = payload.get("training_state")
        return cls(
            class_names=[str(name) for name in payload["class_names"]],
            task=task_named(str(payload.get("task", DEFAULT_TASK)), thresholds=payload.get("thresholds")),
            image=ImageConfig.from_dict(payload["image"]),
            recipe=recipe_from_dict(payload["recipe"], source="stored in checkpoint"),
            temperature=float(payload.get("temperature", 1.0)),
            validation=validation,
            epoch=payload.get("epoch"),
            finished=state.get("finished") if isinstance(state, dict) else None,
            meta=checkpoint_meta(payload),
        )


def read_record(path: Path) -> CheckpointRecord:
    """The typed record of the checkpoint at `path`, without building the model."""
    return CheckpointRecord.of(load_checkpoint(path))


@dataclass
class TrainedModel:
    """A trained model ready to apply: the rebuilt network (eval mode) and what its checkpoint says of it."""

    bundle: ModelBundle
    record: CheckpointRecord

    @property
    def class_names(self) -> list[str]:
        return self.record.class_names

    @property
    def task(self) -> Task:
        return self.record.task

    @property
    def image(self) -> ImageConfig:
        return self.record.image

    @property
    def recipe(self) -> Recipe:
        return self.record.recipe

    @property
    def temperature(self) -> float:
        return self.record.temperature

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.record.validation

    @property
    def meta(self) -> dict[str, Any]:
        return self.record.meta

    def targets_of(self, labels: Iterable[str]) -> np.ndarray:
        """The targets of a split's `label` cells: class indices, or multi-hot rows with several labels per image."""
        labels = list(labels)
        if self.task.name == "multilabel":
            return multi_hot(labels, self.class_names)
        return np.asarray(self.class_indices(labels), dtype=np.int64)

    def class_indices(self, labels: Iterable[str]) -> list[int]:
        """The class index of each label; a label the model does not know is an error."""
        labels = list(labels)
        lookup = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            raise DataError(
                f"class folder(s) {unknown} are not classes of this model {self.class_names}; evaluate only on known classes"
            )
        return [lookup[label] for label in labels]


def checkpoint_path(run: str | Path) -> Path:
    """A run folder's best.pt, or the checkpoint file itself."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise RunDirError(f"run {run} does not exist; pass a run folder written by 'finetune train' or a .pt checkpoint")
    return RunDir(run).best


def _fit_error(exc: RuntimeError, recipe: Recipe, classes: int) -> CheckpointError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = (lines[1] if len(lines) > 1 else lines[0])[:200]
    return CheckpointError(
        f"checkpoint weights do not fit {recipe.model.name} with {classes} classes: {detail}; "
        "the checkpoint was edited or saved for another model or class count"
    )


def model_from_payload(payload: dict[str, Any]) -> TrainedModel:
    """Rebuild the exact model (architecture, head, weights) a checkpoint payload was saved from."""
    record = CheckpointRecord.of(payload)
    bundle = build_model(record.recipe.model, num_classes=len(record.class_names), load_pretrained=False)
    try:
        bundle.model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise _fit_error(exc, record.recipe, len(record.class_names)) from None
    bundle.model.eval()
    return TrainedModel(bundle=bundle, record=record)


def load_trained(run: str | Path) -> TrainedModel:
    """The one loader: a run folder (its best.pt) or a checkpoint file, rebuilt exactly as it was saved."""
    return model_from_payload(load_checkpoint(checkpoint_path(run)))
