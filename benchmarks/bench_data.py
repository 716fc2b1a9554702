"""The data pipeline on real JPEGs: decode + the `standard` train pipeline at 224 px, loader alone and inside training.

Reports images/s of the loader alone for several worker counts, and the fraction of each training step
(ResNet-18, layer4+head trainable, batch 32) spent waiting for data. Run: python benchmarks/bench_data.py
Needs ../shared/datasets/hymenoptera beside the repository.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn

from finetune.data import ImageDataset, list_images, make_loader
from finetune.recipe import TransformsConfig
from finetune.transforms import build_train_pipeline, resolve_image_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera" / "train"


def _dataset(limit: int) -> ImageDataset:
    paths = [str(p) for p in list_images(DATA, [".jpg", ".jpeg", ".png", ".gif"])][:limit]
    model_cfg = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 0.875}
    pipeline = build_train_pipeline(TransformsConfig(train="standard"), resolve_image_config(TransformsConfig(), model_cfg), seed=0)
    return ImageDataset(paths, [0] * len(paths), pipeline)


def loader_alone(dataset: ImageDataset, workers: int, batch: int) -> float:
    start = time.perf_counter()
    count = sum(len(targets) for _, targets in make_loader(dataset, batch_size=batch, num_workers=workers, shuffle=True, seed=0))
    return count / (time.perf_counter() - start)


def wait_fraction(dataset: ImageDataset, workers: int, batch: int) -> tuple[float, float]:
    model = timm.create_model("resnet18", num_classes=2)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("layer4", "fc")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    waited, total = 0.0, time.perf_counter()
    mark = time.perf_counter()
    images = 0
    for inputs, targets in make_loader(dataset, batch_size=batch, num_workers=workers, shuffle=True, seed=0):
        waited += time.perf_counter() - mark
        loss = criterion(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(targets)
        mark = time.perf_counter()
    total = time.perf_counter() - total
    return waited / total, images / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found")
    dataset = _dataset(args.images)
    print(f"{len(dataset)} hymenoptera JPEGs, standard train pipeline at 224 px, torch threads {torch.get_num_threads()}")
    for workers in (0, 1, 2):
        rates = [loader_alone(dataset, workers, 32) for _ in range(args.repeats)]
        print(f"loader alone, num_workers={workers}: {statistics.median(rates):.1f} img/s (median of {args.repeats})")
    for workers in (0, 2):
        runs = [wait_fraction(dataset, workers, 32) for _ in range(args.repeats)]
        fraction = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"training ResNet-18 (layer4+head), num_workers={workers}: {rate:.1f} img/s, waiting for data {fraction:.1%} of the time (target <= 5%)")


if __name__ == "__main__":
    main()
