"""The Python API: keyword-only functions over the use cases in `finetune.runs`, each returning a small result object.

from finetune import load_recipe, train, evaluate, predict

The commands are listed once, in `finetune.commands.COMMANDS`; this module imports each (a test holds them equal).
"""

from __future__ import annotations

from finetune.config.builtin import BuiltinRecipe
from finetune.config.loading import load_recipe
from finetune.config.schema import Recipe
from finetune.data.doctor import CheckResult
from finetune.inference.predictor import Predictor
from finetune.models.inspect import Inspection
from finetune.reporting.diff import ReportDiff, diff_reports
from finetune.reporting.report import Report
from finetune.runs.audit import AuditResult, audit
from finetune.runs.check import check
from finetune.runs.compare import CompareResult, compare
from finetune.runs.cv import CVResult, cross_validate
from finetune.runs.demo import demo
from finetune.runs.evaluate import evaluate
from finetune.runs.explain import ExplainResult, explain
from finetune.runs.export import ExportResult, export
from finetune.runs.inspect import inspect
from finetune.runs.label import LabelResult, label
from finetune.runs.lr_find import LRFindResult, find_lr
from finetune.runs.merge_labels import MergeResult, merge_labels
from finetune.runs.predict import load, predict
from finetune.runs.recipes import recipes, show_recipe
from finetune.runs.serve import serve
from finetune.runs.shard import ShardResult, shard
from finetune.runs.train import TrainResult, train

__all__ = [
    "AuditResult",
    "BuiltinRecipe",
    "CVResult",
    "CheckResult",
    "CompareResult",
    "ExplainResult",
    "ExportResult",
    "Inspection",
    "LabelResult",
    "LRFindResult",
    "MergeResult",
    "Predictor",
    "Recipe",
    "Report",
    "ReportDiff",
    "ShardResult",
    "TrainResult",
    "audit",
    "check",
    "compare",
    "cross_validate",
    "demo",
    "diff_reports",
    "evaluate",
    "explain",
    "export",
    "find_lr",
    "inspect",
    "merge_labels",
    "label",
    "load",
    "load_recipe",
    "predict",
    "recipes",
    "serve",
    "shard",
    "show_recipe",
    "train",
]
