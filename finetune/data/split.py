"""Split samples into train/val/test (stratified, seeded, group-aware) and fix the class order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from finetune.config.schema import DataConfig
from finetune.data.scan import read_samples
from finetune.errors import DataError

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class DatasetIndex:
    """Every sample as a row of `samples` (path, label, split) plus the sorted class names."""

    samples: pd.DataFrame
    class_names: list[str]

    def split(self, name: str) -> pd.DataFrame:
        return self.samples[self.samples["split"] == name].reset_index(drop=True)

    def targets(self, frame: pd.DataFrame) -> list[int]:
        lookup = {name: i for i, name in enumerate(self.class_names)}
        return [lookup[label] for label in frame["label"]]

    @property
    def evaluation_split(self) -> str:
        return evaluation_split(self.samples)


def evaluation_split(samples: pd.DataFrame) -> str:
    """The split a report is computed on: `test` when the samples have one, else `val`."""
    return "test" if (samples["split"] == "test").any() else "val"


def group_keys(frame: pd.DataFrame, pattern: str | None) -> pd.Series | None:
    """The group of every row (from `data.group_pattern` on the file name), or None without a pattern."""
    if pattern is None:
        return None
    regex = re.compile(pattern)
    keys = []
    for path in frame["path"]:
        match = regex.search(Path(path).name)
        if match is None:
            raise DataError(
                f"data.group_pattern '{pattern}' does not match file name {Path(path).name} ({path}); fix the pattern"
            )
        keys.append(match.group(1) if match.groups() else match.group(0))
    return pd.Series(keys, index=frame.index)


def _stratified(
    frame: pd.DataFrame, fraction: float, seed: int, what: str, group_pattern: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, taken): `fraction` of `frame` taken out, stratified by label, groups kept whole."""
    counts = frame["label"].value_counts()
    n_take = int(round(len(frame) * fraction))
    if n_take < counts.size or (counts < 2).any():
        small = counts.idxmin()
        raise DataError(
            f"cannot make a stratified {what} split: class '{small}' has {counts.min()} image(s) and the {what} set "
            f"would hold {n_take} for {counts.size} classes; add images or raise data.{what}_fraction"
        )
    groups = group_keys(frame, group_pattern)
    if groups is None:
        keep, take = train_test_split(frame, test_size=n_take, stratify=frame["label"], random_state=seed)
        return keep, take
    folds = max(2, int(round(1.0 / fraction)))
    if groups.nunique() < folds:
        raise DataError(
            f"data.group_pattern gives {groups.nunique()} group(s); a {what} fraction of {fraction:.2f} needs at least {folds}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    keep_idx, take_idx = next(splitter.split(frame, frame["label"], groups))
    return frame.iloc[keep_idx], frame.iloc[take_idx]


def split_samples(
    samples: pd.DataFrame,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    group_pattern: str | None = None,
    source: str | Path = "the data",
) -> pd.DataFrame:
    """Assign train/val/test to rows without a split (stratified, seeded, groups kept together); pre-split rows are kept.
    Rows that are all pre-split need some in train (`source` names the folder or manifest in the error)."""
    samples = samples.copy()
    if (samples["split"] != "").all():
        if not (samples["split"] == "train").any():
            held = ", ".join(f"{n} in {s}" for s, n in samples["split"].value_counts().sort_index().items())
            raise DataError(
                f"{source} has no training images: every image is pre-split ({held}); mark some split=train "
                "(a train/ folder, or the manifest's split column), or leave the split empty for finetune to split"
            )
        if not (samples["split"] == "val").any() and val_fraction > 0:
            train = samples[samples["split"] == "train"]
            _, val = _stratified(train, val_fraction, seed, "val", group_pattern)
            samples.loc[val.index, "split"] = "val"
        return samples
    pool = samples[samples["split"] == ""]
    if test_fraction > 0:
        pool, test = _stratified(pool, test_fraction, seed, "test", group_pattern)
        samples.loc[test.index, "split"] = "test"
    if val_fraction > 0:
        pool, val = _stratified(pool, val_fraction / (1.0 - test_fraction), seed, "val", group_pattern)
        samples.loc[val.index, "split"] = "val"
    samples.loc[pool.index, "split"] = "train"
    return samples


def make_index(samples: pd.DataFrame, cfg: DataConfig, *, seed: int) -> DatasetIndex:
    """Split, and fix the sorted class order from the training split."""
    samples = split_samples(
        samples,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
        group_pattern=cfg.group_pattern,
        source=cfg.path or "the data",
    )
    train_labels = set(samples.loc[samples["split"] == "train", "label"])
    if len(train_labels) < 2:
        raise DataError(f"{cfg.path}: training needs at least 2 classes, found {sorted(train_labels)}")
    unseen = sorted(set(samples["label"]) - train_labels)
    if unseen:
        raise DataError(f"{cfg.path}: class(es) {unseen} appear in val/test but have no training images")
    samples = samples.sort_values(["split", "label", "path"], key=lambda c: c.map(SPLIT_ORDER) if c.name == "split" else c)
    return DatasetIndex(samples=samples.reset_index(drop=True), class_names=sorted(train_labels))


def load_dataset_index(cfg: DataConfig, *, seed: int) -> DatasetIndex:
    """Scan (or read the manifest), split, and fix the sorted class order (no image is decoded)."""
    return make_index(read_samples(cfg), cfg, seed=seed)
