"""Recipes from YAML files and `--set a.b=value` overrides, with pydantic's errors flattened to one line."""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError

from finetune.config.builtin import builtin_recipes, find_recipe_file
from finetune.config.schema import ModelConfig, Recipe
from finetune.config.train_schema import SPELLINGS
from finetune.errors import RecipeError, did_you_mean
from finetune.files import atomic_write

BOOL_TAG = "tag:yaml.org,2002:bool"


def _yaml12_resolvers() -> dict[Any, list[tuple[str, Any]]]:
    """PyYAML's implicit resolvers with YAML 1.2's booleans: only true/false (so `amp: off` stays the word 'off')."""
    resolvers = {
        first: [(tag, rx) for tag, rx in entries if tag != BOOL_TAG]
        for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    booleans = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
    for first in "tTfF":
        resolvers.setdefault(first, []).insert(0, (BOOL_TAG, booleans))
    return resolvers


class RecipeLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 booleans, refusing duplicate keys (PyYAML would keep the last one silently)."""

    yaml_implicit_resolvers = _yaml12_resolvers()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConstructorError(
                    "while reading a mapping", node.start_mark, f"key '{key}' appears twice", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError) -> tuple[str, str]:
    """(' line N' or ' position N' or '', what the parser objects to, on one line)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow, such as NUL
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character
        return f" position {exc.position}", f"character {character!r} is not allowed in YAML text"
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return (f" line {mark.line + 1}" if mark else ""), problem


def read_yaml(path: Path, *, what: str = "recipe") -> Any:
    """A YAML file as plain data (RecipeLoader), or a one-line RecipeError for unreadable, non-UTF-8 or malformed text."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{what} {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r}); save it as UTF-8 YAML"
        ) from None
    except OSError as exc:
        raise RecipeError(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        where, problem = _yaml_error(exc)
        raise RecipeError(f"{what} {path}{where} is not valid YAML: {problem}") from None


def parse_value(dotted: str, raw: str) -> Any:
    """A `--set` value as YAML (so `3`, `1e-3`, `[head]`, `off` work); tags and malformed YAML are refused."""
    if raw == "":
        return None
    if raw.lstrip().startswith("!"):
        raise RecipeError(f"--set {dotted}={raw}: YAML tags are not accepted; write the plain value, e.g. --set {dotted}=3")
    try:
        return yaml.load(raw, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"--set {dotted}={raw}: not a YAML value ({_yaml_error(exc)}); quote text, e.g. --set {dotted}='a: b'"
        ) from None


def _schema_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the field at `loc` (for suggesting names of unknown keys)."""
    current: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        for cand in [annotation, *getattr(annotation, "__args__", ())]:
            inner = [cand, *getattr(cand, "__args__", ())]
            found = next((c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if found:
                current = found
                break
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _is_internal(part: Any) -> bool:
    """pydantic's union-branch and validator labels inside an error location (not recipe keys)."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def format_validation_error(
    error: ValidationError, source: str, *, prefix: tuple[str, ...] = (), overridden: Sequence[str] = ()
) -> str:
    """Flatten pydantic's errors to `recipe.train.lr: Input should be greater than 0`; a field that an override
    (`overridden`: the --set keys) wrote says so, so the user looks at the command line, not the file."""
    lines = []
    for item in error.errors():
        loc = prefix + tuple(part for part in item["loc"] if not _is_internal(part))
        dotted = ".".join(str(p) for p in loc)
        origin = next((k for k in overridden if dotted == k or dotted.startswith(f"{k}.") or k.startswith(f"{dotted}.")), None)
        where = ".".join(str(p) for p in ("recipe", *loc)) + (f" (from --set {origin})" if origin else "")
        if item["type"] == "extra_forbidden":
            owner = _schema_at(loc)
            hint = did_you_mean(str(loc[-1]), owner.model_fields) if owner else ""
            lines.append(f"{where}: unknown key{hint}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) and item["type"] != "missing" else ""
            lines.append(f"{where}: {msg}{shown}")
    return f"invalid recipe {source}: " + "; ".join(dict.fromkeys(lines))


def model_config_for(name: str, *, base: ModelConfig | None = None) -> ModelConfig:
    """A validated ModelConfig for `name` (unknown names raise RecipeError with a suggestion), without weights."""
    data = {**(base.model_dump() if base else {}), "name": name, "pretrained": False}
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, f"model '{name}'", prefix=("model",))) from None


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Set `a.b.0.c` in a nested dict/list tree (list items by index, e.g. train.phases.0.epochs)."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        index: str | int = key
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"--set {dotted}={raw}: '{key}' is not an index of a list of {len(node)}")
            index = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}={raw}: '{keys[depth - 1]}' is a value, not a section")
        if depth == len(keys) - 1:
            node[index] = parse_value(dotted, raw)
            if isinstance(node, dict):  # `--set train.norm=...` over a file's `bn:` replaces it, and the other way
                for name, older in SPELLINGS:
                    if key in (name, older):
                        node.pop(older if key == name else name, None)
        else:
            if isinstance(node, dict) and node.get(index) is None:
                node[index] = {}
            node = node[index]


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """Split `a.b=value` strings; values are parsed as YAML (so `3`, `1e-3`, `[head]` work)."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set '{item}' is not KEY=VALUE; write e.g. --set train.epochs=3")
        pairs.append((key.strip(), value.strip()))
    return pairs


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as dotted keys (`train.early_stopping.patience`) with their leaf values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def recipe_from_dict(tree: dict[str, Any], *, overrides: Sequence[str] = (), source: str = "<dict>") -> Recipe:
    """Validate a recipe tree after applying dotted overrides."""
    tree = copy.deepcopy(tree)
    pairs = parse_overrides(overrides)
    for key, value in pairs:
        _set_dotted(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, overridden=[key for key, _ in pairs])) from None


def load_recipe(path: str | Path, *, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe file (or a built-in recipe by name: 'last_stage'), apply `--set` style overrides and
    validate it."""
    found = find_recipe_file(path)
    if found is None:
        names = [recipe.name for recipe in builtin_recipes()]
        raise RecipeError(
            f"recipe file {path} not found{did_you_mean(Path(path).stem, names)}; pass a YAML file or a built-in "
            f"recipe: {', '.join(names)} ('finetune recipes' lists them)"
        )
    path = found
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; pass a YAML file such as recipes/quickstart.yaml")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found; pass a YAML file such as recipes/quickstart.yaml")
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections (data, model, train, ...)")
    return recipe_from_dict(tree, overrides=overrides, source=str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default filled in) as YAML text."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe atomically: a kill leaves the old file or the new one."""
    text = recipe_to_yaml(recipe).encode("utf-8")
    atomic_write(Path(path), lambda handle: handle.write(text))
