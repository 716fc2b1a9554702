"""The contract written into every exported file: what the input is, how to make it, what the outputs mean.

ONNX keeps it in `metadata_props` (string to string), TorchScript in the extra file `finetune.json`; both hold the
same keys, values JSON-encoded.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from finetune.data.transforms import ImageConfig
from finetune.inference.checkpoint import TrainedModel
from finetune.inference.task import MultiLabel
from finetune.versions import library_versions

FORMAT = "finetune-export/1"
TORCHSCRIPT_EXTRA = "finetune.json"


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
