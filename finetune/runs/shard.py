"""`finetune shard`: a folder or manifest screened and split as `train` would, written as WebDataset tar shards that
`--data DIR` then trains, evaluates and reports from."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config.builtin import DEFAULT_RECIPE, builtin_recipe
from finetune.config.schema import Recipe
from finetune.data.members import is_shard_folder
from finetune.data.shards import ShardSet, write_shards
from finetune.errors import DataError, RunDirError, UsageError
from finetune.files import recorded_path
from finetune.run_dir import check_destination
from finetune.runs.prepare import prepare_data, refuse_several_labels, resolve_recipe
from finetune.versions import library_versions

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 1000


@dataclass
class ShardResult:
    """Where the shards went, how many images each split holds and how many screening skipped."""

    out: Path
    splits: dict[str, int]
    shards: int
    skipped: int


def _refuse_used_folder(out: Path) -> None:
    """--out must be new or empty: shards are never mixed with other files or an older set of shards."""
    check_destination(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out {out} exists and is not empty; choose a new folder for the shards (or empty it)")


def shard(
    *,
    data: str | Path,
    out: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> ShardResult:
    """Screen `data` (a folder of class folders, train/val/test folders or a CSV manifest) as `train` does, split it
    with the recipe's `data.*` settings and seed (the split `train` would make), and write `out/{split}-%06d.tar`
    shards of `shard_size` images with `shards.json`, `samples.csv` and the screening outcome (`skipped.csv`).

    `recipe` (default: the built-in default) and `overrides` (`data.val_fraction=0.2`, `seed=1`) give the split."""
    out = Path(out)
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: at least 1 image per shard, e.g. 1000")
    if is_shard_folder(data):
        raise UsageError(f"{data} is already a shard folder; give the image folder or CSV manifest it was written from")
    _refuse_used_folder(out)
    refuse_several_labels(data, "shard")
    resolved = resolve_recipe(
        recipe if recipe is not None else builtin_recipe(DEFAULT_RECIPE).path, overrides=overrides, data=data
    )
    prepared = prepare_data(resolved.data, seed=resolved.seed, progress=progress)
    if len(prepared.excluded):
        log.info("%d image(s) left out by data.exclude", len(prepared.excluded))
    meta = {
        "source": recorded_path(data),
        "seed": resolved.seed,
        "val_fraction": resolved.data.val_fraction,
        "test_fraction": resolved.data.test_fraction,
        "group_pattern": resolved.data.group_pattern,
        "finetune_version": library_versions(("finetune",))["finetune"],
    }
    written = write_shards(
        prepared.index, out, shard_size=shard_size, skipped=prepared.skipped, leaks=prepared.leaks, meta=meta, progress=progress
    )
    return _result(written, skipped=len(prepared.skipped))


def _result(shards: ShardSet, *, skipped: int) -> ShardResult:
    splits = {split: shards.count(split) for split in ("train", "val", "test") if shards.count(split)}
    if not splits.get("train"):
        raise DataError(f"{shards.root}: no training images were written")
    log.debug(  # the CLI prints the same summary in one line
        "wrote %d shard(s) to %s: %s; %d image(s) skipped by screening (skipped.csv)",
        len(shards.shards),
        shards.root,
        ", ".join(f"{k} {v}" for k, v in splits.items()),
        skipped,
    )
    return ShardResult(out=shards.root, splits=splits, shards=len(shards.shards), skipped=skipped)
