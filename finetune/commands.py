"""The one list of finetune's commands: the Python API (`finetune.api`), the lazy names of `import finetune` and the
CLI are all checked against it (tests/test_structure.py), so a new command is one module in runs/, one line here,
its import in api.py and its typer skin in cli/.

Plain data only: importing it loads nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A use case: its keyword-only function `name` in `module`, the names it returns, and its CLI spelling."""

    name: str
    module: str
    cli: str | None  # 'eval', 'report diff', 'train --folds'; None: Python only
    results: tuple[str, ...] = ()  # the result types the API also exports


COMMANDS: tuple[Command, ...] = (
    Command("train", "finetune.runs.train", "train", ("TrainResult",)),
    Command("cross_validate", "finetune.runs.cv", "train --folds", ("CVResult",)),
    Command("demo", "finetune.runs.demo", "demo"),
    Command("compare", "finetune.runs.compare", "compare", ("CompareResult",)),
    Command("audit", "finetune.runs.audit", "audit", ("AuditResult",)),
    Command("find_lr", "finetune.runs.lr_find", "lr-find", ("LRFindResult",)),
    Command("evaluate", "finetune.runs.evaluate", "eval", ("Report",)),
    Command("predict", "finetune.runs.predict", "predict"),
    Command("load", "finetune.runs.predict", None, ("Predictor",)),
    Command("label", "finetune.runs.label", "label", ("LabelResult",)),
    Command("merge_labels", "finetune.runs.merge_labels", "merge-labels", ("MergeResult",)),
    Command("check", "finetune.runs.check", "check", ("CheckResult",)),
    Command("shard", "finetune.runs.shard", "shard", ("ShardResult",)),
    Command("inspect", "finetune.runs.inspect", "inspect", ("Inspection",)),
    Command("explain", "finetune.runs.explain", "explain", ("ExplainResult",)),
    Command("export", "finetune.runs.export", "export", ("ExportResult",)),
    Command("serve", "finetune.runs.serve", "serve"),
    Command("recipes", "finetune.runs.recipes", "recipes", ("BuiltinRecipe",)),
    Command("show_recipe", "finetune.runs.recipes", "recipes show"),
    Command("diff_reports", "finetune.reporting.diff", "report diff", ("ReportDiff",)),
)
OTHER_NAMES = {"load_recipe": "finetune.config.loading", "Recipe": "finetune.config.schema"}


def lazy_names() -> dict[str, str]:
    """Every name `import finetune` offers without importing torch, and the module that defines it: the commands,
    their result types (through `finetune.api`) and the recipe."""
    names = {name: "finetune.api" for command in COMMANDS for name in (command.name, *command.results)}
    return names | OTHER_NAMES
