"""`finetune demo`: build a small real dataset (scikit-learn's handwritten digits) and train the quickstart recipe on it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.config.builtin import builtin_recipe

log = logging.getLogger(__name__)


def build_digits_folder(folder: Path, *, size: int = 32) -> Path:
    """Write the 1,797 8x8 digits of `sklearn.datasets.load_digits` as `size` px PNGs in class folders 0..9."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(digits.target):
        log.info("digits dataset already at %s", folder)
        return folder
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.round(pixels / 16.0 * 255.0).astype(np.uint8)
        Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).save(
            folder / str(label) / f"digit_{i:04d}.png"
        )
    log.info("wrote %d digit images to %s", len(digits.target), folder)
    return folder


def default_paths() -> tuple[Path, Path]:
    """(quickstart recipe, digits folder): the built-in recipe, and data_examples/digits in the working folder (beside
    the runs/ that commands write by default), so an installed finetune runs the demo from any folder."""
    return builtin_recipe("quickstart").path, Path("data_examples") / "digits"


def demo_out_dir(base: Path = Path("runs")) -> Path:
    return base / time.strftime("demo-%Y%m%d-%H%M%S")
