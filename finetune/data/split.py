"""Split samples into train/val/test (stratified, seeded, group-aware) and fix the class order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from finetune.config.schema import DataConfig
from finetune.data.scan import manifest_is_multilabel, read_samples, split_labels
from finetune.errors import DataError

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def multi_hot(cells: pd.Series | list[str], class_names: list[str]) -> np.ndarray:
    """N x C float32 of 0/1: which classes each 'cat|dog' cell names (a name outside `class_names` is an error)."""
    lookup = {name: i for i, name in enumerate(class_names)}
    hot = np.zeros((len(cells), len(class_names)), dtype=np.float32)
    for row, cell in enumerate(cells):
        for name in split_labels(str(cell)):
            if name not in lookup:
                raise DataError(f"label '{name}' is no class of this model {class_names}; evaluate only on known labels")
            hot[row, lookup[name]] = 1.0
    return hot


@dataclass(frozen=True)
class DatasetIndex:
    """Every sample as a row of `samples` (path, label, split) plus the sorted class names.

    With `multilabel`, a row's `label` holds all its names joined by | ('cat|dog'; '' for none)."""

    samples: pd.DataFrame
    class_names: list[str]
    multilabel: bool = False

    def split(self, name: str) -> pd.DataFrame:
        return self.samples[self.samples["split"] == name].reset_index(drop=True)

    def targets(self, frame: pd.DataFrame) -> list[int] | list[np.ndarray]:
        """Class indices, or with several labels per image one multi-hot float32 row each."""
        if self.multilabel:
            return list(multi_hot(frame["label"], self.class_names))
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


def _multilabel_stratified(
    frame: pd.DataFrame, fraction: float, seed: int, what: str, group_pattern: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, taken) by iterative stratification (Sechidis et al. 2011, the iterative-stratification package): every
    label's share of positives is kept in both parts as far as the counts allow."""
    if group_pattern is not None:
        raise DataError(
            "data.group_pattern is not supported with several labels per image yet; split the manifest yourself "
            "(a split column) to keep groups together"
        )
    n_take = int(round(len(frame) * fraction))
    if n_take < 1 or n_take >= len(frame):
        raise DataError(
            f"cannot make a {what} split of {fraction:.2f} from {len(frame)} image(s); add images or change data.{what}_fraction"
        )
    names = sorted({n for cell in frame["label"] for n in split_labels(cell)})
    hot = multi_hot(list(frame["label"]), names)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_take, random_state=seed)
    keep_idx, take_idx = next(splitter.split(np.zeros(len(frame)), hot))
    return frame.iloc[np.sort(keep_idx)], frame.iloc[np.sort(take_idx)]


def _stratified(
    frame: pd.DataFrame, fraction: float, seed: int, what: str, group_pattern: str | None = None, multilabel: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, taken): `fraction` of `frame` taken out, stratified by label, groups kept whole."""
    if multilabel:
        return _multilabel_stratified(frame, fraction, seed, what, group_pattern)
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
    multilabel: bool = False,
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
            _, val = _stratified(train, val_fraction, seed, "val", group_pattern, multilabel)
            samples.loc[val.index, "split"] = "val"
        return samples
    pool = samples[samples["split"] == ""]
    if test_fraction > 0:
        pool, test = _stratified(pool, test_fraction, seed, "test", group_pattern, multilabel)
        samples.loc[test.index, "split"] = "test"
    if val_fraction > 0:
        pool, val = _stratified(pool, val_fraction / (1.0 - test_fraction), seed, "val", group_pattern, multilabel)
        samples.loc[val.index, "split"] = "val"
    samples.loc[pool.index, "split"] = "train"
    return samples


def _multilabel_index(samples: pd.DataFrame, cfg: DataConfig) -> DatasetIndex:
    """The class names of a multi-label split: every name with a positive in train; one only in val/test is refused."""
    names = {
        split: {n for cell in samples.loc[samples["split"] == split, "label"] for n in split_labels(cell)}
        for split in SPLIT_ORDER
    }
    if len(names["train"]) < 2:
        raise DataError(f"{cfg.path}: training needs at least 2 label names, found {sorted(names['train'])}")
    unseen = sorted((names["val"] | names["test"]) - names["train"])
    if unseen:
        raise DataError(
            f"{cfg.path}: label(s) {unseen} appear only in val/test and have no positive training image; "
            "add training images that carry them, or remove them from the manifest"
        )
    samples = samples.sort_values(["split", "path"], key=lambda c: c.map(SPLIT_ORDER) if c.name == "split" else c)
    return DatasetIndex(samples=samples.reset_index(drop=True), class_names=sorted(names["train"]), multilabel=True)


def make_index(samples: pd.DataFrame, cfg: DataConfig, *, seed: int, multilabel: bool = False) -> DatasetIndex:
    """Split, and fix the sorted class order from the training split."""
    samples = split_samples(
        samples,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
        group_pattern=cfg.group_pattern,
        multilabel=multilabel,
        source=cfg.path or "the data",
    )
    if multilabel:
        return _multilabel_index(samples, cfg)
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
    return make_index(read_samples(cfg), cfg, seed=seed, multilabel=manifest_is_multilabel(cfg))


def label_counts(index: DatasetIndex) -> pd.DataFrame:
    """Several labels per image: each class's positives per split, and how often it comes with each other class in
    train (the co-occurrence the doctor shows), one row per class."""
    frame = pd.DataFrame({"class": index.class_names})
    for split in SPLIT_ORDER:
        rows = index.split(split)
        frame[split] = multi_hot(rows["label"], index.class_names).sum(axis=0).astype(int) if len(rows) else 0
    hot = multi_hot(index.split("train")["label"], index.class_names)
    together = (hot.T @ hot).astype(int)
    for c, name in enumerate(index.class_names):
        frame[f"with_{name}"] = together[:, c]
    frame["train_images_without_labels"] = int((hot.sum(axis=1) == 0).sum())
    return frame
