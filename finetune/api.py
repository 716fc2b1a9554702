"""The Python API: keyword-only functions over the use cases in `finetune.runs`, each returning a small result object.

from finetune import load_recipe, train, evaluate, predict
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from finetune.config.catalog import IMAGE_EXTENSIONS
from finetune.config.loading import load_recipe
from finetune.config.schema import Recipe
from finetune.data.demo import build_digits_folder, default_paths, demo_out_dir
from finetune.data.doctor import CheckResult, check_dataset
from finetune.data.facts import FactsCache
from finetune.files import check_writable_file, write_text
from finetune.models.inspect import Inspection, inspect_model
from finetune.reporting.diff import ReportDiff, diff_reports
from finetune.runs.audit import AuditResult, audit
from finetune.runs.compare import CompareResult, compare
from finetune.runs.cv import CVResult, cross_validate
from finetune.runs.evaluate import evaluate
from finetune.runs.explain import ExplainResult, explain
from finetune.runs.export import ExportResult, export
from finetune.runs.lr_find import LRFindResult, find_lr
from finetune.runs.predict import Predictor, predict
from finetune.runs.train import TrainResult, train

__all__ = [
    "AuditResult",
    "CVResult",
    "audit",
    "cross_validate",
    "CheckResult",
    "CompareResult",
    "Inspection",
    "LRFindResult",
    "Recipe",
    "ReportDiff",
    "TrainResult",
    "check",
    "compare",
    "demo",
    "diff_reports",
    "evaluate",
    "explain",
    "export",
    "ExportResult",
    "ExplainResult",
    "find_lr",
    "inspect",
    "load_recipe",
    "load",
    "predict",
    "Predictor",
    "train",
]


def check(
    *, data: str | Path, extensions: Sequence[str] | None = None, json_out: str | Path | None = None, progress: bool = True
) -> CheckResult:
    """The dataset doctor over `data`; with `json_out`, every finding is also written there."""
    if json_out is not None:
        check_writable_file(Path(json_out), what="--json", example="check.json")  # before decoding every image, not after
    result = check_dataset(data, extensions=extensions or IMAGE_EXTENSIONS, progress=progress, cache=FactsCache.default())
    if json_out is not None:
        write_text(Path(json_out), json.dumps(result.to_dict(), indent=1, default=str))
    return result


def inspect(*, model: str, recipe: str | Path | Recipe | None = None, input_size: int | None = None) -> Inspection:
    """Parameters, GMACs and trainable/frozen per stage of `model` (and per phase of `recipe`)."""
    loaded = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    return inspect_model(name=model, recipe=loaded, input_size=input_size)


def demo(*, out: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Build data_examples/digits (scikit-learn's handwritten digits) and train recipes/quickstart.yaml on it."""
    recipe, folder = default_paths()
    build_digits_folder(folder)
    return train(recipe=recipe, data=folder, out=out or demo_out_dir(), progress=progress)


def load(run: str | Path) -> Predictor:
    """A run folder, checkpoint or exported file loaded once; `.predict(images)` takes paths, folders, PIL images
    and uint8 arrays and returns a DataFrame."""
    return Predictor(run)
