"""The data pipeline on real JPEGs: decode + the `standard` train pipeline at 224 px, loader alone and inside training.

Reports decode speed (OpenCV, which finetune uses for JPEGs, against PIL), images/s of the loader alone
for several worker counts and OpenCV thread settings, worker start-up time (what persistent_workers
would save per epoch), and the fraction of each training step (ResNet-18, layer4+head trainable,
batch 32) spent waiting for data. Run: python benchmarks/bench_data.py
Needs ../shared/datasets/hymenoptera beside the repository.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from PIL import Image, ImageOps
from torch import nn

from finetune.config.schema import TransformsConfig
from finetune.data.decode import load_image
from finetune.data.loader import ImageDataset, make_loader
from finetune.data.scan import list_images
from finetune.data.transforms import build_train_pipeline, resolve_image_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera" / "train"


def _dataset(limit: int) -> ImageDataset:
    paths = [str(p) for p in list_images(DATA, [".jpg", ".jpeg", ".png", ".gif"])][:limit]
    model_cfg = {
        "input_size": (3, 224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }
    pipeline = build_train_pipeline(
        TransformsConfig(train="standard"), resolve_image_config(TransformsConfig(), model_cfg), seed=0
    )
    return ImageDataset(paths, [0] * len(paths), pipeline)


def _pil_decode(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def decode_rate(paths: list[str], decode) -> float:
    start = time.perf_counter()
    for path in paths:
        decode(path)
    return len(paths) / (time.perf_counter() - start)


def loader_alone(dataset: ImageDataset, workers: int, batch: int) -> float:
    start = time.perf_counter()
    count = sum(len(targets) for _, targets in make_loader(dataset, batch_size=batch, num_workers=workers, shuffle=True, seed=0))
    return count / (time.perf_counter() - start)


def first_batch_seconds(dataset: ImageDataset, workers: int, batch: int) -> float:
    start = time.perf_counter()
    next(iter(make_loader(dataset, batch_size=batch, num_workers=workers, shuffle=True, seed=0)))
    return time.perf_counter() - start


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


def run(*, images: int = 128, repeats: int = 3) -> list[dict]:
    dataset = _dataset(images)
    median = lambda f: statistics.median(f() for _ in range(repeats))  # noqa: E731
    print(f"{len(dataset)} hymenoptera JPEGs, standard train pipeline at 224 px, torch threads {torch.get_num_threads()}")
    opencv, pil = median(lambda: decode_rate(dataset.paths, load_image)), median(lambda: decode_rate(dataset.paths, _pil_decode))
    print(f"decode only: OpenCV (finetune) {opencv:.0f} img/s, PIL {pil:.0f} img/s")
    rows = [
        {
            "figure": "JPEG decode, OpenCV (used) / PIL",
            "measured": f"{opencv:.0f} vs {pil:.0f} img/s",
            "ratio": opencv / pil,
            "target": "> 1 to adopt",
            "met": None,
        }
    ]
    default_threads = cv2.getNumThreads()
    alone = {}
    for threads in (default_threads, 1):
        cv2.setNumThreads(threads)
        for workers in (0, 1, 2):
            alone[threads, workers] = median(lambda workers=workers: loader_alone(dataset, workers, 32))
            print(f"loader alone, num_workers={workers}, cv2 threads {threads}: {alone[threads, workers]:.1f} img/s")
    cv2.setNumThreads(default_threads)
    startup = median(lambda: first_batch_seconds(dataset, 2, 32)) - 1 / alone[default_threads, 0] * 32
    print(f"2 workers: start-up about {startup:.2f} s per epoch (what persistent_workers would save)")
    waits = {}
    for workers in (0, 2):
        runs = [wait_fraction(dataset, workers, 32) for _ in range(repeats)]
        waits[workers] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(
            f"training ResNet-18 (layer4+head), num_workers={workers}: {waits[workers][1]:.1f} img/s, "
            f"waiting for data {waits[workers][0]:.1%} of the time (target <= 5%)"
        )
    best_loader = max(alone[default_threads, w] for w in (0, 1, 2))
    return rows + [
        {
            "figure": "loader alone (decode + standard pipeline) / training consumption, img/s",
            "measured": f"{best_loader:.0f} vs {waits[0][1]:.1f}",
            "ratio": best_loader / waits[0][1],
            "target": "> 1",
            "met": best_loader > waits[0][1],
        },
        {
            "figure": "cv2.setNumThreads(1) / default, loader with 2 workers",
            "measured": f"{alone[1, 2]:.0f} vs {alone[default_threads, 2]:.0f} img/s",
            "ratio": alone[1, 2] / alone[default_threads, 2],
            "target": "> 1 to adopt",
            "met": None,
        },
        {
            "figure": "worker start-up per epoch / epoch time (persistent_workers would save this)",
            "measured": f"{startup:.2f} s of {len(dataset) / waits[2][1]:.1f} s",
            "ratio": startup / (len(dataset) / waits[2][1]),
            "target": "(small: not adopted)",
            "met": None,
        },
        {
            "figure": "data wait fraction, training, num_workers=0",
            "measured": f"{waits[0][0]:.1%}",
            "ratio": waits[0][0],
            "target": "<= 0.05",
            "met": waits[0][0] <= 0.05,
        },
        {
            "figure": "data wait fraction, training, num_workers=2",
            "measured": f"{waits[2][0]:.1%}",
            "ratio": waits[2][0],
            "target": "<= 0.05",
            "met": waits[2][0] <= 0.05,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found")
    run(images=args.images, repeats=args.repeats)


if __name__ == "__main__":
    main()
