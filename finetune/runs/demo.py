"""`finetune demo`: scikit-learn's handwritten digits as an image folder, trained with the built-in quickstart recipe."""

from __future__ import annotations

from pathlib import Path

from finetune.config.loading import load_recipe
from finetune.data.demo import build_digits_folder, default_paths, demo_out_dir, digits_manifest
from finetune.runs.train import TrainResult, train


def demo(*, out: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Build data_examples/digits (scikit-learn's handwritten digits) and its split, data_examples/digits.csv, in
    which no pair of look-alike digits crosses a split; train the built-in quickstart recipe on it."""
    recipe, folder = default_paths()
    quickstart = load_recipe(recipe)
    build_digits_folder(folder)
    split = quickstart.data
    manifest = digits_manifest(folder, seed=quickstart.seed, val_fraction=split.val_fraction, test_fraction=split.test_fraction)
    return train(recipe=quickstart, data=manifest, out=out or demo_out_dir(), progress=progress)
