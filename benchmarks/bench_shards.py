"""Shards against the folder on the hymenoptera photos: one epoch's read + decode + train pipeline, and training.

1. `finetune shard` writes the photos (screened, split as train would) as WebDataset shards of 64 images.
2. One epoch of the train split through the same `standard` pipeline at 224 px, from the folder (finetune's
   ImageDataset in a shuffled DataLoader) and from the shards (the ShardStream: whole tar files in sequence, a
   shuffle buffer), alternating, with 0 and 2 loader workers: images/s and the ratio shards / folder, measured in
   the same run.
3. `quickstart` (32 px, no weights) trained 2 epochs from each: with one batch per epoch and no augmentation both
   train on the same images in one step, so the metrics agree up to the order of sums inside the batch; with the
   recipe's own batches and augmentation the order differs (a shuffle buffer, not a permutation) and the metrics
   are reported side by side.

Run: python benchmarks/bench_shards.py   (needs ../shared/datasets/hymenoptera beside the repository)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from finetune.api import shard, train
from finetune.config.schema import TransformsConfig
from finetune.data.loader import ImageDataset, make_loader
from finetune.data.shards import read_shard_set, shard_index
from finetune.data.stream import ShardStream, tar_samples
from finetune.data.transforms import build_train_pipeline, resolve_image_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
MODEL_CFG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}
ONE_STEP = ["data.batch_size=512", "transforms.train=none", "model.pretrained=false"]


def _datasets(shards: Path) -> tuple[ImageDataset, ShardStream]:
    """The train split as files (the very files the shards were written from) and as the stream, same pipeline."""
    shard_set = read_shard_set(shards, verify=False)
    index = shard_index(shard_set)
    rows = index.split("train")
    samples = pd.read_csv(shards / "samples.csv")  # in the index's order, with the file each image came from
    sources = samples.loc[samples["split"] == "train", "source"]
    pipeline = build_train_pipeline(
        TransformsConfig(train="standard"), resolve_image_config(TransformsConfig(), MODEL_CFG), seed=0
    )
    targets = [int(t) for t in index.targets(rows)]
    folder = ImageDataset(list(sources), targets, pipeline)
    counts = [s.count for s in shard_set.of_split("train")]
    return folder, ShardStream(shard_set.paths("train"), counts, targets, pipeline)


def epoch_rate(dataset, workers: int, seed: int) -> float:
    """Images/s of one epoch through the loader (read, decode, augment, collate), nothing else."""
    start = time.perf_counter()
    count = sum(len(t) for _, t in make_loader(dataset, batch_size=32, num_workers=workers, shuffle=True, seed=seed))
    return count / (time.perf_counter() - start)


def _evict(paths: list[str]) -> None:
    """Ask the kernel to drop these files from the page cache (POSIX_FADV_DONTNEED: no root needed; a virtual disk's
    host may still hold them), so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rates(folder: ImageDataset, stream: ShardStream, *, cold: bool) -> tuple[float, float]:
    """Images/s of reading the bytes alone (no decoding): a file opened per image against whole tar files in sequence;
    `cold`: both evicted from the page cache first."""
    if cold:
        _evict(folder.paths + stream.urls)
    start = time.perf_counter()
    for path in folder.paths:
        Path(path).read_bytes()
    files = len(folder.paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    count = sum(1 for url in stream.urls for _ in tar_samples(url))  # what the stream reads with
    return files, count / (time.perf_counter() - start)


def throughput(shards: Path, repeats: int) -> dict[int | str, tuple[float, float]]:
    folder, stream = _datasets(shards)
    rates: dict[int | str, tuple[float, float]] = {}
    for cold in (False, True):
        reads = [read_rates(folder, stream, cold=cold) for _ in range(repeats)]
        rates[f"read {'cold' if cold else 'warm'}"] = (
            statistics.median(r[0] for r in reads),
            statistics.median(r[1] for r in reads),
        )
    for name in ("read warm", "read cold"):
        files, tars = rates[name]
        print(f"bytes only, page cache {name[5:]}: files {files:.0f} img/s, shards {tars:.0f} img/s, ratio {tars / files:.2f}")
    for workers in (0, 2):
        pairs = [(epoch_rate(folder, workers, seed), epoch_rate(stream, workers, seed)) for seed in range(repeats)]  # alternating
        rates[workers] = (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs))
        print(
            f"one epoch of {len(folder)} images at 224 px, num_workers={workers}: folder {rates[workers][0]:.1f} img/s, "
            f"shards {rates[workers][1]:.1f} img/s, ratio {rates[workers][1] / rates[workers][0]:.2f}",
            flush=True,
        )
    return rates


def trained_pair(shards: Path, root: Path, overrides: list[str], tag: str, epochs: int) -> tuple[dict, dict]:
    """`quickstart` with `overrides` trained from the folder and from the shards: their report metrics."""
    metrics = []
    for name, data in (("folder", DATA), ("shards", shards)):
        result = train(
            recipe="quickstart", data=data, out=root / f"{tag}-{name}", overrides=overrides, epochs=epochs, progress=False
        )
        metrics.append(result.report.metrics)
        keys = ("accuracy", "macro_f1", "nll")
        print(
            f"quickstart {tag} from {name}: " + ", ".join(f"{k} {result.report.metrics.get(k, float('nan')):.4f}" for k in keys)
        )
    return metrics[0], metrics[1]


def run(*, repeats: int = 5, epochs: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        written = shard(data=DATA, out=root / "shards", shard_size=64, recipe="quickstart", progress=False)
        print(f"shard: {written.shards} shards ({written.splits}) in {time.perf_counter() - began:.1f} s (screening included)")
        rates = throughput(root / "shards", repeats)
        same_a, same_b = trained_pair(root / "shards", root, ONE_STEP, "one-step", epochs)
        own_a, own_b = trained_pair(root / "shards", root, ["model.pretrained=false"], "own-batches", epochs)
    rows = [
        {
            "figure": f"shards / folder, reading the bytes alone, page cache {name[5:]}",
            "measured": f"{rates[name][1]:.0f} vs {rates[name][0]:.0f} img/s",
            "ratio": rates[name][1] / rates[name][0],
            "target": "> 1",
            "met": rates[name][1] > rates[name][0],
        }
        for name in ("read warm", "read cold")
    ]
    rows += [
        {
            "figure": f"shards / folder, one epoch read+decode+standard 224 px, {w} workers",
            "measured": f"{rates[w][1]:.1f} vs {rates[w][0]:.1f} img/s",
            "ratio": rates[w][1] / rates[w][0],
            "target": "> 1 (shards read faster)",
            "met": rates[w][1] > rates[w][0],
        }
        for w in (0, 2)
    ]
    equal = same_a["accuracy"] == same_b["accuracy"] and same_a["macro_f1"] == same_b["macro_f1"]
    rows.append(
        {
            "figure": f"quickstart {epochs} epochs, one step per epoch: accuracy shards / folder",
            "measured": f"{same_b['accuracy']:.4f} vs {same_a['accuracy']:.4f}",
            "ratio": same_b["accuracy"] / same_a["accuracy"],
            "target": "equal metrics",
            "met": equal,
        }
    )
    rows.append(
        {
            "figure": f"quickstart {epochs} epochs, its own batches: accuracy shards / folder",
            "measured": f"{own_b['accuracy']:.4f} vs {own_a['accuracy']:.4f}",
            "ratio": own_b["accuracy"] / own_a["accuracy"],
            "target": "- (another order)",
            "met": None,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads the hymenoptera photos")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(2)
    for row in run(repeats=args.repeats, epochs=args.epochs):
        print(f"{row['figure']}: {row['measured']} (ratio {row['ratio']:.3g}; target {row['target']})")


if __name__ == "__main__":
    main()
