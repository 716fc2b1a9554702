"""Cross-validation folds (stratified, seeded, group-aware) and the exclusion list of `data.exclude`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from finetune.data.scan import split_labels
from finetune.data.split import group_keys, multi_hot, split_samples
from finetune.errors import DataError
from finetune.files import path_key, read_text_table

log = logging.getLogger(__name__)


def _label_counts(pool: pd.DataFrame, multilabel: bool) -> pd.Series:
    """Images per class (with several labels per image: positives per name)."""
    if multilabel:
        return pd.Series([n for cell in pool["label"] for n in split_labels(cell)]).value_counts()
    return pool["label"].value_counts()


def _check_fold_count(pool: pd.DataFrame, folds: int, multilabel: bool = False) -> None:
    if folds < 2:
        raise DataError(f"--folds {folds}: cross-validation needs at least 2 folds (5 is usual)")
    counts = _label_counts(pool, multilabel)
    if folds > counts.min():
        raise DataError(
            f"--folds {folds} is more than the {counts.min()} image(s) of class '{counts.idxmin()}' outside the test split; "
            f"every fold must hold each class: use --folds {max(counts.min(), 2)} or fewer, or add images"
        )


def _fold_numbers(pool: pd.DataFrame, folds: int, seed: int, group_pattern: str | None, multilabel: bool = False) -> pd.Series:
    groups = group_keys(pool, group_pattern)
    numbers = pd.Series(0, index=pool.index)
    if multilabel:  # iterative stratification: every label's positives spread over the folds
        if groups is not None:
            raise DataError("data.group_pattern is not supported with several labels per image yet; leave it out")
        hot = multi_hot(list(pool["label"]), sorted(_label_counts(pool, True).index))
        splits = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(pool)), hot)
    elif groups is None:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(pool, pool["label"])
    else:
        if groups.nunique() < folds:
            raise DataError(f"data.group_pattern gives {groups.nunique()} group(s); --folds {folds} needs at least {folds}")
        splits = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(pool, pool["label"], groups)
    for number, (_, held) in enumerate(splits, start=1):
        numbers.iloc[held] = number
    return numbers


def assign_folds(
    samples: pd.DataFrame, *, folds: int, seed: int, test_fraction: float, group_pattern: str | None, multilabel: bool = False
) -> pd.DataFrame:
    """`samples` (path, label, split) with a `fold` column: 1..K for every image outside the test split, 0 for test.

    A test split stays out of the folds: the folder's own test/, or `test_fraction` taken first (stratified, seeded).
    Train and val folders of a pre-split folder are pooled.
    """
    if (samples["split"] != "").all():
        table = samples.assign(split=samples["split"].where(samples["split"] == "test", ""))
    elif test_fraction > 0:
        table = split_samples(
            samples, val_fraction=0.0, test_fraction=test_fraction, seed=seed, group_pattern=group_pattern, multilabel=multilabel
        )
        table["split"] = table["split"].where(table["split"] == "test", "")
    else:
        table = samples.assign(split="")
    pool = table[table["split"] != "test"]
    _check_fold_count(pool, folds, multilabel)
    table["fold"] = 0
    table.loc[pool.index, "fold"] = _fold_numbers(pool, folds, seed, group_pattern, multilabel)
    classes = set(pool["label"])
    for number in range(1, folds + 1):
        if multilabel:
            break  # a fold may lack a label's positives: its average precision then leaves that label out
        missing = sorted(classes - set(table.loc[table["fold"] == number, "label"]))
        if missing:
            raise DataError(
                f"data.group_pattern leaves fold {number} without class '{missing[0]}' (its images sit in too few groups); "
                "use fewer folds or a pattern with more groups"
            )
    return table.reset_index(drop=True)


def fold_manifest(table: pd.DataFrame, fold: int, *, multilabel: bool = False) -> pd.DataFrame:
    """The manifest of fold run `fold`: its fold is the val split, the other folds train, the test split stays test
    (with several labels per image, a `labels` column of names joined by |)."""
    split = table["fold"].map(lambda f: "test" if f == 0 else "val" if f == fold else "train")
    return pd.DataFrame({"path": table["path"], "labels" if multilabel else "label": table["label"], "split": split})


def apply_exclude(samples: pd.DataFrame, listing: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, excluded) rows: `listing` is a CSV with a `path` column; paths match after resolving."""
    if listing is None:
        return samples, samples.iloc[:0]
    if not Path(listing).is_file():
        raise DataError(f"data.exclude: {listing} does not exist; give a CSV with a 'path' column, or remove data.exclude")
    table = read_text_table(Path(listing))
    if "path" not in table.columns:
        raise DataError(f"data.exclude: {listing} has no 'path' column (columns: {', '.join(map(str, table.columns))})")
    wanted = {path_key(p) for p in table["path"]}
    resolved = samples["path"].map(path_key)
    hit = resolved.isin(wanted)
    unknown = len(wanted - set(resolved))
    if unknown:
        log.warning("data.exclude: %d path(s) of %s are not in the data (already removed?)", unknown, listing)
    log.info("data.exclude: %d image(s) left out, listed in excluded.csv", int(hit.sum()))
    return samples[~hit].reset_index(drop=True), samples[hit].reset_index(drop=True)
