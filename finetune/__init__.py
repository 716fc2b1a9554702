"""finetune: transfer learning for ResNets on your own image folders.

    from finetune import load_recipe, train, evaluate, predict

The API is imported on first use, so `finetune --help` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune.errors import FinetuneError

__version__ = "0.1.0"
_LAZY = {
    "train": "finetune.api",
    "evaluate": "finetune.api",
    "predict": "finetune.api",
    "compare": "finetune.api",
    "find_lr": "finetune.api",
    "check": "finetune.api",
    "inspect": "finetune.api",
    "demo": "finetune.api",
    "explain": "finetune.api",
    "export": "finetune.api",
    "load": "finetune.api",
    "audit": "finetune.api",
    "cross_validate": "finetune.api",
    "Predictor": "finetune.api",
    "TrainResult": "finetune.api",
    "load_recipe": "finetune.config.loading",
    "Recipe": "finetune.config.schema",
}
__all__ = ["FinetuneError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
