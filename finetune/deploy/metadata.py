"""The contract written into every exported file: what the input is, how to make it, what the outputs mean.

ONNX keeps it in `metadata_props` (string to string), TorchScript in the extra file `finetune.json`; both hold the
same keys, values JSON-encoded. The exporter seals the contract with its SHA-256 (`contract_sha256`); a reader checks
the seal, then every field's type and range (`check_contract`), before it trusts a single value.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, get_args

from finetune.config.schema import TtaView
from finetune.data.transforms import ImageConfig
from finetune.errors import CheckpointError
from finetune.inference.checkpoint import TrainedModel
from finetune.inference.task import TASKS, MultiLabel
from finetune.versions import library_versions

FORMAT = "finetune-export/1"
TORCHSCRIPT_EXTRA = "finetune.json"
CHECKSUM = "contract_sha256"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")  # the names finetune.data.transforms resizes with
MAX_SIDE = 2048  # the recipe's largest input_size


def resize_rule(image: ImageConfig) -> dict[str, Any]:
    """How to turn any photo into the model's input, in words a non-finetune consumer can follow."""
    return {
        "short_side": math.floor(image.input_size / image.crop_pct),
        "crop": image.input_size,
        "crop_pct": image.crop_pct,
        "interpolation": image.interpolation,
        "steps": "resize the shorter side to short_side (Pillow, the given interpolation; the longer side int(short_side * long / short)), "
        "then centre-crop crop x crop with offsets int(round((size - crop) / 2))",
    }


def _decision_rule(loaded: TrainedModel) -> dict[str, Any]:
    """Several labels per image: each class's threshold on 'probs' (chosen on the validation split)."""
    task = loaded.task
    if not isinstance(task, MultiLabel):
        return {}
    return {
        "thresholds": [float(t) for t in task.cutoffs(len(loaded.class_names))],
        "decision": "every class with probs >= its threshold",
    }


def contract(loaded: TrainedModel, *, exporter: str, weights: str) -> dict[str, Any]:
    """Everything a consumer needs besides the weights."""
    recipe = json.dumps(loaded.recipe.to_dict(), sort_keys=True).encode("utf-8")
    return {
        "format": FORMAT,
        "class_names": loaded.class_names,
        "input": {
            "name": "image",
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "height": loaded.image.input_size,
            "width": loaded.image.input_size,
        },
        "outputs": {"logits": "raw scores", "probs": loaded.task.probability_rule},
        "resize": resize_rule(loaded.image),
        "mean": list(loaded.image.mean),
        "std": list(loaded.image.std),
        "temperature": loaded.temperature,
        "top_k": loaded.recipe.eval.top_k,
        "tta": list(loaded.recipe.eval.tta),
        "tta_note": "the graph sees one view; for the run's test-time views run it once per view and average 'probs'",
        "recipe_sha256": hashlib.sha256(recipe).hexdigest(),
        "model_name": loaded.recipe.model.name,
        "checkpoint_epoch": loaded.record.epoch,
        "task": loaded.task.name,
        **_decision_rule(loaded),
        "weights": weights,
        "exporter": exporter,
        "versions": library_versions(),
    }


def to_strings(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props are strings: every value JSON-encoded."""
    return {key: json.dumps(value) for key, value in meta.items()}


def from_strings(props: dict[str, str]) -> dict[str, Any]:
    return {key: json.loads(value) for key, value in props.items()}


def _digest(meta: dict[str, Any]) -> str:
    body = {key: value for key, value in meta.items() if key != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """The contract with its checksum, as every exported file stores it."""
    return {**meta, CHECKSUM: _digest(meta)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _triple(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_number(v) for v in value)


def _class_names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 1
        and all(isinstance(name, str) and name.strip() for name in value)
        and len(set(value)) == len(value)
    )


def _resize(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _count(value.get("crop"), 1, MAX_SIDE)
        and _number(value.get("crop_pct"))
        and 0 < value["crop_pct"] <= 1
        and value["crop"] / value["crop_pct"] <= 4 * MAX_SIDE  # the shorter side photos are resized to
        and value.get("interpolation") in INTERPOLATIONS
    )


def _input(value: Any) -> bool:
    return isinstance(value, dict) and _count(value.get("height"), 1, MAX_SIDE) and value.get("height") == value.get("width")


FIELDS: dict[str, tuple[Any, str]] = {  # key: (test, what a valid value is)
    "class_names": (_class_names, "a list of distinct, non-empty class names"),
    "input": (_input, f"height and width, equal whole numbers from 1 to {MAX_SIDE}"),
    "resize": (
        _resize,
        f"crop (1 to {MAX_SIDE}), crop_pct in (0, 1] with crop / crop_pct at most {4 * MAX_SIDE}, and interpolation one "
        f"of {', '.join(INTERPOLATIONS)}",
    ),
    "mean": (_triple, "three finite numbers"),
    "std": (lambda v: _triple(v) and all(x > 0 for x in v), "three finite numbers above 0"),
    "temperature": (lambda v: _number(v) and v > 0, "a finite number above 0"),
    "top_k": (lambda v: _count(v, 1, 100), "a whole number from 1 to 100"),
    "tta": (
        lambda v: isinstance(v, list) and all(n in get_args(TtaView) for n in v) and len(set(v)) == len(v),
        f"a list of distinct test-time views from {', '.join(get_args(TtaView))}",
    ),
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
}


def check_contract(meta: dict[str, Any], path: Path) -> None:
    """Refuse, in one line, a contract that is not finetune's, was changed after export, or holds a value a reader
    cannot use; `meta` is then safe to read."""
    if meta.get("format") != FORMAT or "class_names" not in meta:
        raise CheckpointError(
            f"{path} carries no finetune metadata (class names, input size, resize rule); "
            "export the run with 'finetune export RUN' and predict with that file"
        )
    if CHECKSUM not in meta:
        raise CheckpointError(f"{path} has no contract checksum (an older or another exporter wrote it); export the run again")
    if meta[CHECKSUM] != _digest(meta):
        raise CheckpointError(
            f"{path}: its metadata was changed after export (the contract checksum does not match); export the run again "
            "rather than editing the file"
        )
    for key, (valid, expected) in FIELDS.items():
        if key not in meta:
            raise CheckpointError(f"{path}: its metadata lacks '{key}' ({expected}); export the run again")
        if not valid(meta[key]):
            shown = json.dumps(meta[key])[:80]
            raise CheckpointError(f"{path}: metadata '{key}' is {shown}, expected {expected}; export the run again")
    thresholds = meta.get("thresholds")
    if meta["task"] == MultiLabel.name and not (
        isinstance(thresholds, list)
        and len(thresholds) == len(meta["class_names"])
        and all(_number(t) and 0 <= t <= 1 for t in thresholds)
    ):
        shown = json.dumps(thresholds)[:80]
        raise CheckpointError(
            f"{path}: metadata 'thresholds' is {shown}, expected one number from 0 to 1 per class; export the run again"
        )
    if meta["input"]["height"] != meta["resize"]["crop"]:
        raise CheckpointError(
            f"{path}: metadata input {meta['input']['height']} px differs from its resize crop {meta['resize']['crop']} px; "
            "export the run again"
        )
