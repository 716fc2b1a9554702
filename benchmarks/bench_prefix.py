"""last_stage (layer4 + head train, stem..layer3 frozen with frozen BatchNorm) on the hymenoptera photos, with
and without the frozen prefix's output cached, for ResNet-18 and ResNet-50 at 224 px.

Same recipe both ways: the standard augmenting pipeline; the cached run keeps `cache_views: 4` augmented views per
image (each epoch picks one), the uncached one augments afresh. Reports the median epoch time after the first
(target: cached >= 3x faster), the first epoch (which computes the views), the cache's disk size per 1,000
images (float16) and the final validation accuracy of each.
Run: python benchmarks/bench_prefix.py   (needs ../shared/datasets/hymenoptera)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from finetune import train
from finetune.config.loading import recipe_from_dict

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
VIEWS = 4


def last_stage(cache: str, out: Path, *, epochs: int, model: str) -> tuple[list[float], float, float]:
    recipe = recipe_from_dict(
        {
            "seed": 0,
            "data": {"path": str(DATA), "batch_size": 32, "num_workers": 0},
            "model": {"name": model, "pretrained": False},
            "transforms": {"train": "standard"},
            "eval": {"gradcam": False},
            "train": {
                "epochs": epochs,
                "lr": 0.001,
                "trainable": ["layer4", "head"],
                "bn": "frozen",
                "feature_cache": cache,
                "cache_views": VIEWS,
            },
        }
    )
    started = time.perf_counter()
    result = train(recipe=recipe, out=out, progress=False)
    return list(result.history["seconds"]), float(result.history["val_accuracy"].iloc[-1]), time.perf_counter() - started


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.npy"))


def measure(model: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        os.environ["FINETUNE_CACHE_DIR"] = str(cache)
        plain, plain_acc, plain_wall = last_stage("off", Path(tmp) / "plain", epochs=epochs, model=model)
        cached, cached_acc, cached_wall = last_stage("auto", Path(tmp) / "cached", epochs=epochs, model=model)
        images = 245 * VIEWS + 153  # train views + val
        per_thousand = _size(cache) / images * 1000 / 1024**2
    uncached_epoch, cached_epoch = statistics.median(plain[1:]), statistics.median(cached[1:])
    ratio = uncached_epoch / cached_epoch
    print(f"{model} last_stage on hymenoptera, {epochs} epochs, 224 px, cache_views {VIEWS}")
    print(f"  uncached: epochs {', '.join(f'{s:.1f}' for s in plain)} s; val acc {plain_acc:.4f}; run {plain_wall:.0f} s")
    print(f"  cached:   epochs {', '.join(f'{s:.1f}' for s in cached)} s; val acc {cached_acc:.4f}; run {cached_wall:.0f} s")
    print(
        f"  epochs after the first: {uncached_epoch:.1f} vs {cached_epoch:.1f} s -> {ratio:.2f}x (target >= 3x); cache {per_thousand:.0f} MiB per 1,000 image views"
    )
    return {
        "model": model,
        "ratio": ratio,
        "uncached": uncached_epoch,
        "cached": cached_epoch,
        "mib": per_thousand,
        "first": cached[0],
        "plain_first": plain[0],
    }


def run(*, epochs: int = 3, models: tuple[str, ...] = ("resnet18", "resnet50")) -> list[dict]:
    rows = []
    for model in models:
        r = measure(model, epochs)
        rows.append(
            {
                "figure": f"last_stage epoch after the first, uncached / cached prefix ({r['model']}, 224 px)",
                "measured": f"{r['uncached']:.1f} vs {r['cached']:.1f} s; first cached epoch {r['first']:.1f} s; {r['mib']:.0f} MiB/1,000 views",
                "ratio": r["ratio"],
                "target": ">= 3",
                "met": r["ratio"] >= 3,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    args = parser.parse_args()
    run(epochs=args.epochs, models=tuple(args.models))


if __name__ == "__main__":
    main()
