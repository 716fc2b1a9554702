"""Linear probe on the hymenoptera photos with and without the feature cache.

Three runs of the same head-only recipe (ResNet-18 at 224 px, eval pipeline, frozen BN): uncached,
cached into an empty cache folder, and cached again (a second run reusing the folder). Reports the
median epoch time after the first, the ratio uncached/cached (target >= 10x), the first epoch
(which computes the features), and validation accuracy (target: within 1 point of uncached).
Run: python benchmarks/bench_cache.py   (needs ../shared/datasets/hymenoptera)
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


def probe(cache: str, out: Path, *, epochs: int, model: str) -> tuple[list[float], float, float]:
    recipe = recipe_from_dict(
        {
            "seed": 0,
            "data": {"path": str(DATA), "batch_size": 32, "num_workers": 0},
            "model": {"name": model, "pretrained": False},
            "transforms": {"train": "none"},
            "train": {
                "epochs": epochs,
                "lr": 0.003,
                "freeze": ["stem", "layer1", "layer2", "layer3", "layer4"],
                "feature_cache": cache,
            },
        }
    )
    started = time.perf_counter()
    result = train(recipe=recipe, out=out, progress=False)
    return list(result.history["seconds"]), float(result.history["val_accuracy"].iloc[-1]), time.perf_counter() - started


def run(*, epochs: int = 4, model: str = "resnet18") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
        plain, plain_acc, plain_wall = probe("off", Path(tmp) / "plain", epochs=epochs, model=model)
        first, first_acc, first_wall = probe("auto", Path(tmp) / "first", epochs=epochs, model=model)
        again, again_acc, again_wall = probe("auto", Path(tmp) / "again", epochs=epochs, model=model)
    uncached, cached = statistics.median(plain[1:]), statistics.median(first[1:])
    print(f"{model} linear probe on hymenoptera, {epochs} epochs, 224 px")
    print(f"  uncached: epochs {', '.join(f'{s:.2f}' for s in plain)} s; val acc {plain_acc:.4f}; run {plain_wall:.0f} s")
    print(
        f"  cached, empty cache: epochs {', '.join(f'{s:.3f}' for s in first)} s (the first computes the features); "
        f"val acc {first_acc:.4f}; run {first_wall:.0f} s"
    )
    print(
        f"  cached, second run: epochs {', '.join(f'{s:.3f}' for s in again)} s; val acc {again_acc:.4f}; run {again_wall:.0f} s"
    )
    return [
        {
            "figure": f"probe epoch after the first, uncached / cached ({model}, 224 px)",
            "measured": f"{uncached:.2f} s / {cached:.3f} s",
            "ratio": uncached / cached,
            "target": ">= 10",
            "met": uncached / cached >= 10,
        },
        {
            "figure": "probe val accuracy, cached - uncached (points)",
            "measured": f"{first_acc:.4f} vs {plain_acc:.4f}",
            "ratio": 100 * (first_acc - plain_acc),
            "target": "within +-1",
            "met": abs(first_acc - plain_acc) <= 0.01,
        },
        {
            "figure": "probe first epoch, second run (cache reused) / first run",
            "measured": f"{again[0]:.2f} s / {first[0]:.2f} s",
            "ratio": again[0] / first[0],
            "target": "(reuse)",
            "met": None,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found")
    for row in run(epochs=args.epochs, model=args.model):
        print(f"{row['figure']}: {row['measured']} -> {row['ratio']:.3g} (target {row['target']})")


if __name__ == "__main__":
    main()
