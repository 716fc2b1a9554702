"""`finetune inspect`: a model's stages, parameters and GMACs, and what each phase of a recipe trains."""

from __future__ import annotations

from pathlib import Path

from finetune.config.loading import load_recipe
from finetune.config.schema import Recipe
from finetune.models.inspect import Inspection, inspect_model


def inspect(*, model: str, recipe: str | Path | Recipe | None = None, input_size: int | None = None) -> Inspection:
    """Parameters, GMACs and trainable/frozen per stage of `model` (and per phase of `recipe`)."""
    loaded = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    return inspect_model(name=model, recipe=loaded, input_size=input_size)
