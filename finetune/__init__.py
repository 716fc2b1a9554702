"""finetune: transfer learning for ResNets on your own image folders.

    from finetune import load_recipe, train, evaluate, predict

The API is imported on first use, so `finetune --help` answers without loading torch.

The house, one sub-package per stage of the data flow; imports only point down (tests/test_structure.py):

    errors, commands        the error family; the one list of commands (API, lazy names, CLI)
    files, versions, run_dir  atomic writes and paths; library versions; every path of a run folder
    config/      the pydantic Recipe, YAML and --set overrides, the catalog of names
    data/        scan folders/manifests, split, decode, transforms, loaders, the dataset doctor
    models/      backbone families (stage maps), build, weights, freeze + normalisation policy
    inference/   the trained model: checkpoint record and its one loader, the forward pass with test-time
                 views, user inputs, Predictor, reject rule, and the task object (SingleLabel)
    training/    the loop over phases, optimizer/schedules, add-ons (EMA, early stopping, trackers), caches, DDP
    evaluation/  metrics over predictions, calibration, intervals, Grad-CAM, the label audit
    deploy/      exported ONNX/TorchScript graphs, their contract, runtimes and parity
    reporting/   report files, plots, HTML, diffs
    runs/        one module per command (train, eval, predict, export, ...): commands only, plus prepare.py
    api.py, cli/ the keyword-only API and the thin typer skin over it
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune.commands import lazy_names
from finetune.errors import FinetuneError

__version__ = "0.1.0"
_LAZY = lazy_names()  # finetune.commands lists the commands once
__all__ = ["FinetuneError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
