"""`finetune demo`: build a small real dataset (scikit-learn's handwritten digits) and train the quickstart recipe on it.

The digits hold near-identical pictures (34 pairs within perceptual-hash distance 4); split at random, some land on
both sides of a split and flatter the test score. The demo's manifest splits them as `train` would split the folder
(stratified, seeded, the same sizes) but keeps each group of look-alikes in one split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from finetune.config.builtin import builtin_recipe
from finetune.data.doctor import examine_all
from finetune.data.duplicates import duplicate_pairs
from finetune.data.facts import FactsCache
from finetune.data.split import split_samples
from finetune.files import write_table

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


def digits_manifest(folder: Path, *, seed: int, val_fraction: float, test_fraction: float) -> Path:
    """FOLDER.csv beside the digits folder: path (relative to the CSV), label and split of every digit, with no
    duplicate pair across splits (see the module's docstring)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*/*.png"))
    samples = pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths], "split": ""})
    samples = split_samples(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    facts = examine_all(list(samples["path"]), progress=False, cache=FactsCache.default())  # training reuses them
    pairs = duplicate_pairs(samples, facts)
    samples["split"] = keep_groups_whole(samples, pairs, seed=seed)
    manifest = folder.parent / f"{folder.name}.csv"
    write_table(samples.assign(path=[p.relative_to(folder.parent).as_posix() for p in paths]), manifest)
    log.info("%s: %d look-alike pair(s) kept within one split", manifest, len(pairs))
    return manifest


def keep_groups_whole(samples: pd.DataFrame, pairs: pd.DataFrame, *, seed: int) -> list[str]:
    """The splits of `samples` with every group of duplicates (connected by `pairs`) moved into the split most of it
    is in; each moved image trades places with a lone image of its class there, so every class keeps its split sizes."""
    position = {path: i for i, path in enumerate(samples["path"])}
    parent = list(range(len(samples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(pairs["path_a"], pairs["path_b"]):
        parent[root(position[a])] = root(position[b])
    groups: dict[int, list[int]] = {}
    for i in range(len(samples)):
        groups.setdefault(root(i), []).append(i)
    split, labels = list(samples["split"]), list(samples["label"])
    taken = {i for members in groups.values() if len(members) > 1 for i in members}
    rng = np.random.default_rng(seed)
    for members in (m for m in groups.values() if len(m) > 1):
        target = max(("train", "val", "test"), key=[split[i] for i in members].count)  # on a tie the first of these
        for i in (i for i in members if split[i] != target):
            lone = [j for j in range(len(samples)) if j not in taken and split[j] == target and labels[j] == labels[i]]
            if lone:
                partner = lone[int(rng.integers(len(lone)))]
                split[partner] = split[i]
                taken.add(partner)
            split[i] = target
    return split


def default_paths() -> tuple[Path, Path]:
    """(quickstart recipe, digits folder): the built-in recipe, and data_examples/digits in the working folder (beside
    the runs/ that commands write by default), so an installed finetune runs the demo from any folder."""
    return builtin_recipe("quickstart").path, Path("data_examples") / "digits"


def demo_out_dir(base: Path = Path("runs")) -> Path:
    return base / time.strftime("demo-%Y%m%d-%H%M%S")


def build_multilabel_digits(folder: Path, *, images: int = 1500, size: int = 64, classes: int = 6, seed: int = 0) -> Path:
    """A multi-label example from scikit-learn's digits: `images` pictures of `size` px, each holding 1 to 3 different
    digits of 0..classes-1 in cells of a 2 x 2 grid (the others black); FOLDER.csv beside it lists path,labels (the
    digits present, joined by |) and split: the first 70% train, then 15% val, the last 15% test. The 8x8 digits
    are cut in two halves first: train and val pictures draw from one, test pictures from the other, so no digit
    drawing seen in training comes back in the test split."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(digits.target == d)) for d in range(classes)]
    cell = size // 2
    rows = []
    test_from = int(images * 0.85)
    for k in range(images):
        chosen = sorted(rng.choice(classes, size=int(rng.integers(1, 4)), replace=False).tolist())
        canvas = np.zeros((size, size), dtype=np.uint8)
        for digit, spot in zip(chosen, rng.permutation(4)):
            pool = pools[digit]
            half = pool[: len(pool) // 2] if k < test_from else pool[len(pool) // 2 :]
            pixels = np.round(digits.images[int(rng.choice(half))] / 16.0 * 255.0).astype(np.uint8)
            side = int(rng.integers(cell * 5 // 8, cell + 1))  # size and place vary, so no two pictures look alike
            tile = np.asarray(Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.BICUBIC))
            top = (spot // 2) * cell + int(rng.integers(0, cell - side + 1))
            left = (spot % 2) * cell + int(rng.integers(0, cell - side + 1))
            canvas[top : top + side, left : left + side] = tile
        name = f"picture_{k:05d}.png"
        Image.fromarray(canvas, mode="L").save(folder / name)
        split = "train" if k < int(images * 0.7) else "val" if k < test_from else "test"
        rows.append({"path": f"{folder.name}/{name}", "labels": "|".join(str(d) for d in chosen), "split": split})
    samples = pd.DataFrame(rows)
    kept = _without_lookalikes_across_splits(samples.assign(path=[str(folder.parent / p) for p in samples["path"]]))
    manifest = folder.parent / f"{folder.name}.csv"
    write_table(samples[kept], manifest)
    log.info("wrote %d multi-label pictures (%d classes, %d px) and %s", int(kept.sum()), classes, size, manifest)
    return manifest


def _without_lookalikes_across_splits(samples: pd.DataFrame) -> np.ndarray:
    """Which pictures to keep: a dark picture with one digit in a corner can look like another to a perceptual hash
    (the leakage check would flag the pair), so the val or test picture of every such pair across splits is left out."""
    facts = examine_all(list(samples["path"]), progress=False, cache=FactsCache.default())
    pairs = duplicate_pairs(samples.assign(label=samples["labels"]), facts)
    crossing = pairs[pairs["split_a"] != pairs["split_b"]]
    order = {"train": 0, "val": 1, "test": 2}
    dropped = {
        b if order[sb] > order[sa] else a
        for a, b, sa, sb in crossing[["path_a", "path_b", "split_a", "split_b"]].itertuples(index=False)
    }
    return ~samples["path"].isin(dropped).to_numpy()
