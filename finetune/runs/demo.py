"""`finetune demo`: scikit-learn's handwritten digits as an image folder, trained with recipes/quickstart.yaml."""

from __future__ import annotations

from pathlib import Path

from finetune.data.demo import build_digits_folder, default_paths, demo_out_dir
from finetune.runs.train import TrainResult, train


def demo(*, out: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Build data_examples/digits (scikit-learn's handwritten digits) and train recipes/quickstart.yaml on it."""
    recipe, folder = default_paths()
    build_digits_folder(folder)
    return train(recipe=recipe, data=folder, out=out or demo_out_dir(), progress=progress)
