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
    "TrainResult": "finetune.api",
    "load_recipe": "finetune.recipe",
    "Recipe": "finetune.recipe",
}
__all__ = ["FinetuneError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
