"""The recipes that ship with finetune, by name: `finetune train last_stage` works from any folder.

Their one source is the repository's top-level `recipes/`; `finetune/recipes` is a link to it, so the package
data of an installed wheel and a checkout read the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.errors import RecipeError, did_you_mean

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHORT, LINE = 40, 100  # a summary sentence shorter than SHORT gets the next one; LINE: the most characters shown
DEFAULT_RECIPE = "last_stage"  # `finetune train --data D` without a recipe: layer4 + head of a pretrained ResNet-50


@dataclass(frozen=True)
class BuiltinRecipe:
    """A shipped recipe: its name (the file's stem), file, and the first sentence of its comment header."""

    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def summary(self) -> str:
        """The header comment's first sentence (two when the first is short), without the 'name:' it starts with,
        cut to fit a terminal line."""
        header = []
        for line in self.text.splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        sentences = " ".join(header).removeprefix(f"{self.name}:").strip().split(". ")
        shown = sentences[0]
        if len(shown) < SHORT and len(sentences) > 1:
            shown = f"{shown}: {sentences[1]}"
        shown = shown.rstrip(".")
        return shown if len(shown) <= LINE else shown[: shown.rfind(" ", 0, LINE - 3)].rstrip(",;:(") + "..."


def builtin_recipes() -> list[BuiltinRecipe]:
    """Every shipped recipe, by name."""
    return [BuiltinRecipe(name=path.stem, path=path) for path in sorted(RECIPES.glob("*.yaml"))]


def builtin_recipe(name: str) -> BuiltinRecipe:
    """The shipped recipe called `name` (with or without .yaml); an unknown name lists the shipped ones."""
    stem = name.removesuffix(".yaml")
    shipped = {recipe.name: recipe for recipe in builtin_recipes()}
    if stem not in shipped:
        raise RecipeError(
            f"no built-in recipe '{name}'{did_you_mean(stem, shipped)}; built-in: {', '.join(shipped)} "
            "('finetune recipes' lists them), or give a YAML file"
        )
    return shipped[stem]


def find_recipe_file(value: str | Path) -> Path | None:
    """The file a recipe argument means: an existing file as given, else the built-in recipe it names ('last_stage',
    'last_stage.yaml', or 'recipes/last_stage.yaml' from a folder without that file), else None."""
    path = Path(value)
    if path.exists():
        return path
    names = {recipe.name: recipe.path for recipe in builtin_recipes()}
    bare = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "recipes")
    if bare and path.suffix in ("", ".yaml") and path.stem in names:
        return names[path.stem]
    return None
