"""Everything a training-like command does before its first step, shared by `train` and `lr-find`.

Cheap checks come first (weights reachable, device present), so a mistake costs seconds, not a pass
over every image; then the images are screened, split and checked for leakage; then the model is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import pandas as pd
from pydantic import ValidationError

from finetune.config.builtin import DEFAULT_RECIPE, builtin_recipe
from finetune.config.catalog import STAGES
from finetune.config.loading import (
    flatten,
    format_validation_error,
    load_recipe,
    model_config_for,
    recipe_from_dict,
    save_recipe,
)
from finetune.config.schema import DataConfig, ModelConfig, Recipe
from finetune.data.decode import load_image, printable
from finetune.data.doctor import ImageFacts, screen_samples, split_leakage
from finetune.data.duplicates import pair_count
from finetune.data.facts import FactsCache
from finetune.data.folds import apply_exclude
from finetune.data.members import is_shard_folder
from finetune.data.scan import manifest_is_multilabel, read_samples
from finetune.data.shards import read_shard_set, screening_outcome, shard_index
from finetune.data.split import DatasetIndex, make_index
from finetune.data.transforms import ImageConfig, build_eval_pipeline, build_train_pipeline, check_pipeline, resolve_image_config
from finetune.errors import DataError, RecipeError, RunDirError, UsageError, WeightsError
from finetune.files import recorded_path
from finetune.inference.device import check_device
from finetune.models.build import ModelBundle, build_model
from finetune.models.weights import check_hub_reachable
from finetune.run_dir import RunDir
from finetune.training.loss import class_weights
from finetune.training.seeding import seed_everything
from finetune.training.tracking import check_trackers

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The screened, split dataset of a run, with what screening skipped and the duplicates across splits."""

    index: DatasetIndex
    skipped: pd.DataFrame
    leaks: pd.DataFrame
    excluded: pd.DataFrame  # rows left out by data.exclude


@dataclass
class PreparedModel:
    """The model with its weights, and the pipelines sized and normalised for it."""

    bundle: ModelBundle
    image: ImageConfig
    train_pipeline: A.Compose
    eval_pipeline: A.Compose


@dataclass
class PreparedRun:
    data: PreparedData
    model: PreparedModel
    class_weights: list[float] | None


def check_cheap_things(recipe: Recipe, *, warn: bool = True) -> None:
    """Fail in seconds on what needs no image: weights that cannot be had, a device that is not there, a tracker
    that is not installed (and, with `warn`, say when frozen stages stay random)."""
    check_weights_available(recipe.model)
    if warn:
        warn_random_frozen_stages(recipe)
    check_device(recipe.train.device)
    check_trackers(recipe.log)


def warn_random_frozen_stages(recipe: Recipe) -> None:
    """Frozen stages of a model without weights stay random for the whole run: say so, once, before anything slow."""
    if recipe.model.pretrained is not False:
        return
    trained = {stage for phase in recipe.train.resolved_phases() for stage in phase.trainable_stages()}
    frozen = [stage for stage in STAGES if stage not in trained and stage != "head"]
    if frozen:
        log.warning(
            "model.pretrained is false, so %s never train and keep their random initial weights: the trainable stages "
            "learn from random features. Give weights (model.pretrained: true, or a file) for transfer learning, "
            "or train every stage (recipes/full_finetune.yaml, recipes/from_scratch_small.yaml)",
            ", ".join(frozen),
        )


def check_weights_available(cfg: ModelConfig) -> None:
    if cfg.pretrained is True:
        check_hub_reachable(cfg.name)
    elif isinstance(cfg.pretrained, Path) and not cfg.pretrained.is_file():
        raise WeightsError(f"weights file {cfg.pretrained} does not exist; fix model.pretrained")
    elif isinstance(cfg.pretrained, Path) and cfg.pretrained.stat().st_size == 0:
        raise WeightsError(f"weights file {cfg.pretrained} is empty (0 bytes): an interrupted download or copy? Fetch it again")


def prepare_shards(cfg: DataConfig, *, seed: int, progress: bool) -> PreparedData:
    """A shard folder's images as `finetune shard` screened and split them (every shard's sha256 checked first)."""
    shards = read_shard_set(Path(cfg.path or ""), progress=progress)
    written = {k: shards.meta.get(k) for k in ("seed", "val_fraction", "test_fraction", "group_pattern")}
    asked = {"seed": seed, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    if cfg.exclude is not None or any(written[k] != v for k, v in asked.items() if k in written):
        log.info(
            "%s: the split is the shards' own (written with %s); data.exclude and the recipe's split settings do not apply",
            cfg.path,
            ", ".join(f"{k} {v}" for k, v in written.items() if v is not None),
        )
    skipped, leaks = screening_outcome(shards)
    index = shard_index(shards)
    return PreparedData(index=index, skipped=skipped, leaks=leaks, excluded=pd.DataFrame(columns=index.samples.columns))


def prepare_data(cfg: DataConfig, *, seed: int, progress: bool, known: Mapping[str, ImageFacts] | None = None) -> PreparedData:
    """Scan, leave out `data.exclude`, screen (decode every image once; `known` ones are not decoded again), split,
    and look for duplicates across the splits. A shard folder was screened and split as it was written."""
    if is_shard_folder(cfg.path):
        return prepare_shards(cfg, seed=seed, progress=progress)
    samples, excluded = apply_exclude(read_samples(cfg), cfg.exclude)
    # absolute paths in the run (splits.csv, predictions): valid from any working directory, for a resume or an eval
    samples = samples.assign(path=[recorded_path(p) for p in samples["path"]])
    multilabel = manifest_is_multilabel(cfg)
    screened = screen_samples(
        samples, policy=cfg.bad_images, progress=progress, known=known, cache=FactsCache.default(), multilabel=multilabel
    )
    index = make_index(screened.samples, cfg, seed=seed, multilabel=multilabel)
    if not (index.samples["split"] == "val").any():
        raise DataError("no validation images: set data.val_fraction above 0 or add a val/ folder")
    leaks = split_leakage(index.samples, screened.facts)
    if len(leaks):
        first = leaks.iloc[0]
        message = (
            f"{pair_count(leaks)} duplicate pair(s) across splits (e.g. {first['path_a']} [{first['split_a']}] ~ "
            f"{first['path_b']} [{first['split_b']}]); val/test scores may be inflated"
        )
        if cfg.strict_split:
            raise DataError(message + "; remove the copies, or set data.group_pattern, or data.strict_split: false")
        log.warning("%s; listed in leakage.csv. HINT: run 'finetune check' and remove the copies", message)
    return PreparedData(index=index, skipped=screened.skipped, leaks=leaks, excluded=excluded)


def prepare_model(recipe: Recipe, *, num_classes: int, load_pretrained: bool = True) -> PreparedModel:
    """Build the model (seeded, so a new head starts the same every time) and its train/eval pipelines."""
    seed_everything(recipe.seed)
    bundle = build_model(recipe.model, num_classes=num_classes, load_pretrained=load_pretrained)
    image = resolve_image_config(recipe.transforms, bundle.data_config)
    return PreparedModel(
        bundle=bundle,
        image=image,
        train_pipeline=build_train_pipeline(recipe.transforms, image, seed=recipe.seed),
        eval_pipeline=build_eval_pipeline(image),
    )


def prepare_run(recipe: Recipe, *, progress: bool, known: Mapping[str, ImageFacts] | None = None) -> PreparedRun:
    """Cheap checks, then data, then model and loss weights: what `train` and `lr-find` start from."""
    check_cheap_things(recipe, warn=known is None)  # `known`: a cross-validation fold, whose run has checked and warned
    data = prepare_data(recipe.data, seed=recipe.seed, progress=progress, known=known)
    if recipe.train.early_stopping.metric == "val_mean_average_precision" and not data.index.multilabel:
        raise RecipeError(
            "train.early_stopping.metric val_mean_average_precision needs several labels per image (a manifest with a "
            "'labels' column); use auto, val_accuracy, val_macro_f1 or val_loss"
        )
    model = prepare_model(recipe, num_classes=len(data.index.class_names))
    first = data.index.split("train")["path"].iloc[0]
    check_pipeline(model.train_pipeline, load_image(first), source=f"training image {printable(first)}")
    weights = class_weights(
        recipe.loss, class_names=data.index.class_names, targets=data.index.targets(data.index.split("train"))
    )
    return PreparedRun(data=data, model=model, class_weights=weights)


def refuse_several_labels(data: str | Path | None, command: str) -> None:
    """Commands that assume one label per image refuse a manifest with a `labels` column, in one line."""
    if data is not None and manifest_is_multilabel(DataConfig(path=Path(data))):
        raise UsageError(
            f"{command} handles one label per image for now, and {data} has a 'labels' column (several per image); "
            "train it with 'finetune train' and read its report"
        )


RESUME_FREE = {"data.num_workers"}  # settings a resumed run may change without changing its result


@dataclass(frozen=True)
class QuickTry:
    """The quick-try options of train and compare: another backbone (`--model`) and another length (`--epochs N` in
    all, `--epochs-scale F` per phase, `--max-epochs N` at most), phases changing in proportion."""

    model: str | None = None
    epochs: int | None = None
    epochs_scale: float | None = None
    max_epochs: int | None = None

    def given(self) -> list[str]:
        """The options set, as the CLI spells them."""
        return [f"--{name.replace('_', '-')}" for name, value in vars(self).items() if value is not None]

    def apply(self, recipe: Recipe, source: str | Path) -> Recipe:
        """`recipe` with the model and length asked for; a length no recipe can take is a UsageError."""
        if self.model is not None:
            model_config_for(self.model)  # an unknown name: one line with a suggestion
            tree = recipe.to_dict()
            tree["model"]["name"] = self.model
            recipe = recipe_from_dict(tree, source=f"{source} with --model {self.model}")
        if self.epochs is None and self.epochs_scale is None and self.max_epochs is None:
            return recipe
        for option, value, lowest in (("--epochs", self.epochs, 1), ("--max-epochs", self.max_epochs, 1)):
            if value is not None and value < lowest:
                raise UsageError(f"{option} {value}: at least {lowest}")
        if self.epochs_scale is not None and self.epochs_scale <= 0:
            raise UsageError(
                f"--epochs-scale {self.epochs_scale}: a factor above 0, e.g. 0.2 for a fifth of every phase's epochs"
            )
        try:
            return recipe.with_epochs(total=self.epochs, scale=self.epochs_scale, cap=self.max_epochs)
        except ValidationError as exc:  # the new phase lengths break a rule of the recipe (mixup before a cached phase)
            raise UsageError(format_validation_error(exc, f"{source} shortened")) from None
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}") from None


def resolve_recipe(
    recipe: Recipe | dict[str, Any] | str | Path | None,
    *,
    overrides: Sequence[str] = (),
    data: str | Path | None = None,
    quick: QuickTry | None = None,
) -> Recipe:
    """A validated recipe from a file, a built-in name, a dict (as the YAML would read) or a Recipe, with `--set`
    overrides, the quick-try options and `--data` applied. Without a recipe but with data: the built-in default."""
    if recipe is None and data is None:
        raise UsageError("train needs a recipe (e.g. recipes/quickstart.yaml), or resume=True with an existing run")
    if recipe is None:
        default = builtin_recipe(DEFAULT_RECIPE)
        log.info(
            "no recipe given: training the built-in '%s' (%s); 'finetune recipes' lists the others", default.name, default.summary
        )
        recipe = default.path
    source = recipe if isinstance(recipe, (str, Path)) else "the recipe"
    if isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe, overrides=overrides)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides=overrides)
    elif overrides:
        recipe = recipe_from_dict(recipe.to_dict(), overrides=overrides)
    if quick is not None:
        recipe = quick.apply(recipe, source)
    return recipe.with_data(data) if data is not None else recipe


def run_name(recipe: Recipe | dict[str, Any] | str | Path | None) -> str:
    """The name a run folder gets from its recipe: the file's stem, the built-in default's name, else 'run'."""
    if recipe is None:
        return DEFAULT_RECIPE
    return Path(recipe).stem if isinstance(recipe, (str, Path)) else "run"


def changed_settings(old: Recipe, new: Recipe) -> str:
    """'key: old -> new, ...' for up to three settings that differ (those in RESUME_FREE never count); '' if none."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_FREE)
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:3])


def save_run_recipe(run: RunDir, recipe: Recipe) -> None:
    """The recipe at the start (kept aside), then recipe.yaml last: its presence marks a resumable folder."""
    save_recipe(recipe, run.started_recipe)
    save_recipe(recipe, run.recipe)


def refuse_edited_since_start(run: RunDir, recipe: Recipe) -> None:
    """--resume: recipe.yaml must still say what the run started with (folders from before this check have no copy)."""
    if not run.started_recipe.is_file():
        return
    edits = changed_settings(load_recipe(run.started_recipe), recipe)
    if edits:
        raise RunDirError(
            f"cannot resume {run.root}: recipe.yaml was edited after the run started ({edits}); "
            "put it back as it was, or start a new run with the edited recipe"
        )


def refuse_changed_recipe(
    stored: Recipe,
    recipe: Recipe | dict[str, Any] | str | Path | None,
    overrides: Sequence[str],
    data: str | Path | None,
    run: RunDir,
) -> None:
    """--resume with a recipe, overrides or --data: they must be the run's own (up to settings that do not change results)."""
    if data is not None and Path(data).resolve() != Path(stored.data.path or "").resolve():
        raise RunDirError(
            f"--resume {run.root} --data {data}: the run trains on {stored.data.path}; resume without --data, "
            f"or start a new run on {data}"
        )
    if recipe is None and not overrides:
        return
    if recipe is None:
        candidate = recipe_from_dict(stored.to_dict(), overrides=overrides)
    else:
        candidate = resolve_recipe(recipe, overrides=overrides).with_data(stored.data.path)
    edits = changed_settings(stored, candidate)
    if edits:
        raise RunDirError(
            f"--resume {run.root}: the recipe differs from the run's ({edits}); resume without a recipe, or start a new run"
        )
