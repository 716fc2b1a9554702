"""finetune: transfer learning for ResNets on your own image folders.

    from finetune import load_recipe, train, evaluate, predict
"""

from finetune.api import TrainResult, evaluate, predict, train
from finetune.errors import FinetuneError
from finetune.recipe import Recipe, load_recipe

__all__ = ["FinetuneError", "Recipe", "TrainResult", "evaluate", "load_recipe", "predict", "train"]
__version__ = "0.1.0"
