"""One epoch over a DataLoader with workers, wrapped by tqdm.auto as finetune did (which iterated the loader twice:
its constructor calls iter(), so the workers started twice and the shuffle order was drawn twice) against
`finetune.bars.progress` (one iterator), alternating in one process. Real photos (hymenoptera/train, eval pipeline
at 224 px), batch 32. Run: python benchmarks/bench_loader_once.py [--repeats 3] [--workers 2]"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from finetune.bars import progress
from finetune.config.schema import TransformsConfig
from finetune.data.loader import ImageDataset, make_loader
from finetune.data.scan import list_images
from finetune.data.transforms import build_eval_pipeline, resolve_image_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera" / "train"


def _epoch(wrap, loader) -> float:
    start = time.perf_counter()
    for _ in wrap(loader, disable=True):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    paths = [str(p) for p in list_images(DATA, (".jpg", ".jpeg", ".png"))]
    pipeline = build_eval_pipeline(
        resolve_image_config(
            TransformsConfig(input_size=224),
            {
                "input_size": (3, 224, 224),
                "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225),
                "crop_pct": 0.875,
                "interpolation": "bilinear",
            },
        )
    )
    dataset = ImageDataset(paths, [0] * len(paths), pipeline)
    times: dict[str, list[float]] = {"tqdm.auto (before)": [], "bars.progress (now)": []}
    for repeat in range(args.repeats):
        for name, wrap in times.items() if repeat % 2 == 0 else reversed(list(times.items())):
            loader = make_loader(dataset, batch_size=32, num_workers=args.workers, shuffle=True, seed=repeat)
            wrap.append(_epoch(tqdm if name.startswith("tqdm") else progress, loader))
    before, now = (statistics.median(v) for v in times.values())
    print(
        f"{len(paths)} photos, {args.workers} workers, {args.repeats} repeats: before {before:.2f} s, now {now:.2f} s per epoch, ratio {before / now:.2f}x"
    )


if __name__ == "__main__":
    main()
