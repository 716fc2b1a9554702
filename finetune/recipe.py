"""The recipe: one strict pydantic schema that every stage reads, loaded from YAML plus `--set` overrides."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import FinetuneError, RecipeError, did_you_mean
from finetune.files import atomic_write

STAGES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
Stage = Literal["stem", "layer1", "layer2", "layer3", "layer4", "head"]
BnPolicy = Literal["frozen", "train"]
SINGLE_PHASE_FIELDS = ("epochs", "lr", "freeze", "bn")  # the one-phase shorthand; phases replace them
TRAIN_PRESETS: tuple[str, ...] = ("none", "light", "standard", "strong")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images are and how they are split and batched."""

    path: Path | None = Field(None, description="Image folder (flat or train/val/test) or a CSV manifest.")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    sampler: Literal["shuffle", "weighted"] = Field("shuffle", description="weighted: draw classes equally often.")
    bad_images: Literal["skip", "fail"] = Field("skip", description="skip: list unreadable files in RUN/skipped.csv; fail: stop before training.")
    strict_split: bool = Field(False, description="Duplicates across train/val/test are an error instead of a warning.")
    group_pattern: str | None = Field(None, description="Regex on the file name; its first group (or match) keeps a group in one split.")

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"]
    )

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9 so that training keeps data")
        return self


TransformList = list[dict[str, dict[str, Any]]]


class TransformsConfig(_Strict):
    """Albumentations pipelines; size and normalisation default to the model's pretrained config."""

    train: Union[Literal["none", "light", "standard", "strong"], TransformList] = "standard"
    input_size: int | None = Field(None, ge=16, le=2048)
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: Any) -> Any:
        if value is not None and min(value) <= 0:
            raise ValueError("every std value must be above 0")
        return value

    @field_validator("train", mode="before")
    @classmethod
    def _check_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in TRAIN_PRESETS:
            raise ValueError(f"unknown preset '{value}'{did_you_mean(value, TRAIN_PRESETS)}; use one of {list(TRAIN_PRESETS)} or a list of transforms")
        if isinstance(value, list):
            from finetune.transforms import build_transform  # local: keeps import of the schema light

            for item in value:
                if not isinstance(item, dict) or len(item) != 1:
                    raise ValueError(f"each transform is a one-key mapping like '- HorizontalFlip: {{p: 0.5}}', got {item!r}")
                (name, kwargs), = item.items()
                try:
                    build_transform(name, kwargs or {})
                except FinetuneError as exc:
                    raise ValueError(str(exc)) from None
            return [{name: (kwargs or {})} for item in value for name, kwargs in item.items()]
        return value


class HeadConfig(_Strict):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    hidden: int | None = Field(None, ge=1)


class ModelConfig(_Strict):
    name: str = "resnet18"
    pretrained: Union[bool, Path] = False
    head: HeadConfig = Field(default_factory=HeadConfig)
    small_input: bool = Field(False, description="3x3/stride-1 stem, no max-pool (CIFAR-style) for 32-64 px images.")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from finetune.model import known_model_names  # local: timm import is slow

        names = known_model_names()
        if value not in names:
            raise ValueError(f"unknown model '{value}'{did_you_mean(value, names)}; ResNet-family timm names or 'tv:' + a torchvision ResNet")
        return value

    @field_validator("pretrained", mode="before")
    @classmethod
    def _path_or_bool(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value


class PhaseConfig(_Strict):
    """One block of epochs with a fixed set of trainable stages."""

    epochs: int = Field(ge=1)
    train: Union[Literal["all"], list[Stage]] = "all"
    lr: float = Field(gt=0.0, le=10.0)
    lr_mult: dict[Stage, float] = Field(default_factory=dict)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    bn: BnPolicy = "frozen"

    @field_validator("train")
    @classmethod
    def _nonempty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("at least one stage must be trainable")
        return value

    def trainable(self) -> tuple[str, ...]:
        return STAGES if self.train == "all" else tuple(s for s in STAGES if s in self.train)


class EarlyStoppingConfig(_Strict):
    metric: Literal["val_accuracy", "val_loss", "val_macro_f1"] = "val_accuracy"
    patience: int | None = Field(None, ge=1, description="Epochs without improvement before stopping; null = off.")
    min_delta: float = Field(0.0, ge=0.0)
    restore_best: bool = Field(False, description="At the end of each phase, go back to that phase's best weights.")


class TrainConfig(_Strict):
    """Optimisation. Either `epochs`/`lr`/`freeze`/`bn` (one phase) or a list of `phases`."""

    epochs: int = Field(5, ge=1, le=10000)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    freeze: list[Stage] = Field(default_factory=list)
    bn: BnPolicy = "frozen"
    phases: list[PhaseConfig] | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.01, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    feature_cache: Literal["auto", "off"] = Field(
        "auto", description="Head-only phases with frozen BN train on pooled features cached on disk (FINETUNE_CACHE_DIR)."
    )
    cache_views: int = Field(0, ge=0, le=64, description="Cache this many augmented views per image (0: the eval pipeline only).")

    @model_validator(mode="after")
    def _phases_or_single(self) -> "TrainConfig":
        if self.phases is not None:
            if not self.phases:
                raise ValueError("phases is an empty list; remove it or give at least one phase")
            set_here = self.model_fields_set & set(SINGLE_PHASE_FIELDS)
            if set_here:
                raise ValueError(f"{sorted(set_here)} conflict with phases; set epochs/lr/train/bn per phase instead")
        elif set(self.freeze) == set(STAGES):
            raise ValueError("freeze lists every stage, so nothing would train; leave at least 'head' out")
        return self

    def resolved_phases(self) -> list[PhaseConfig]:
        """The phases to run; a recipe without phases is one phase."""
        if self.phases is not None:
            return list(self.phases)
        trainable = [s for s in STAGES if s not in self.freeze]
        return [PhaseConfig(epochs=self.epochs, lr=self.lr, train="all" if len(trainable) == len(STAGES) else trainable, bn=self.bn)]


class LossConfig(_Strict):
    """Cross-entropy options."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Union[Literal["none", "balanced", "effective_number"], dict[str, float]] = "none"
    beta: float = Field(0.999, gt=0.0, lt=1.0, description="effective_number's beta (Cui et al. 2019).")

    @field_validator("class_weights")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(w <= 0 for w in value.values()):
            raise ValueError("class weights must be above 0")
        return value


class EvalConfig(_Strict):
    top_k: int = Field(5, ge=1, le=100)


class Recipe(_Strict):
    """A complete, validated training recipe."""

    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (paths as strings), suitable for YAML and checkpoints; reloads to an equal recipe."""
        exclude = {"train": set(SINGLE_PHASE_FIELDS)} if self.train.phases is not None else None
        return self.model_dump(mode="json", exclude=exclude)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the field at `loc` (for suggesting names of unknown keys)."""
    current: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for cand in candidates:
            inner = [cand, *getattr(cand, "__args__", ())]
            found = next((c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if found:
                current = found
                break
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(error: ValidationError, source: str, *, prefix: tuple[str, ...] = ()) -> str:
    """Flatten pydantic's errors to `recipe.train.lr: Input should be greater than 0 (in FILE)`."""
    lines = []
    for item in error.errors():
        loc = prefix + tuple(part for part in item["loc"] if not (isinstance(part, str) and ("[" in part or part.startswith("function-"))))
        where = ".".join(str(p) for p in ("recipe", *loc))
        if item["type"] == "extra_forbidden":
            owner = _model_at(loc)
            hint = did_you_mean(str(loc[-1]), owner.model_fields) if owner else ""
            lines.append(f"{where}: unknown key{hint}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) and item["type"] != "missing" else ""
            lines.append(f"{where}: {msg}{shown}")
    unique = list(dict.fromkeys(lines))
    return f"invalid recipe {source}: " + "; ".join(unique)


def model_config(name: str, *, base: ModelConfig | None = None) -> ModelConfig:
    """A validated ModelConfig for `name` (unknown names raise RecipeError with a suggestion)."""
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
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"--set {dotted}={raw}: '{key}' is not an index of a list of {len(node)}")
            key = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}={raw}: '{keys[depth - 1]}' is a value, not a section")
        if last:
            node[key] = yaml.safe_load(raw) if raw != "" else None
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Split `a.b=value` strings; values are parsed as YAML (so `3`, `1e-3`, `[head]` work)."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set '{item}' is not KEY=VALUE; write e.g. --set train.epochs=3")
        pairs.append((key.strip(), value.strip()))
    return pairs


def recipe_from_dict(tree: dict[str, Any], *, overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>") -> Recipe:
    """Validate a recipe tree after applying dotted overrides."""
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def load_recipe(path: str | Path, *, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe file, apply `--set` style overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found; pass a YAML file such as recipes/quickstart.yaml")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections (data, model, train, ...)")
    return recipe_from_dict(tree, overrides=overrides, source=str(path))


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (every default filled in), atomically: a kill leaves the old file or the new one."""
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode("utf-8")
    atomic_write(Path(path), lambda handle: handle.write(text))
