"""`finetune recipes`: the recipes that ship with finetune, one line each; `recipes show NAME` prints one to copy."""

from __future__ import annotations

from finetune.config.builtin import BuiltinRecipe, builtin_recipe, builtin_recipes


def recipes() -> list[BuiltinRecipe]:
    """The built-in recipes (name, file, one-line summary); any of them works where a recipe file does."""
    return builtin_recipes()


def show_recipe(*, name: str) -> str:
    """The YAML text of built-in recipe `name`, to copy and edit (`finetune recipes show last_stage > mine.yaml`)."""
    return builtin_recipe(name).text
