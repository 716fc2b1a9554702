"""Screening (finetune/data/doctor.py `examine_all`): one process against worker processes, on generated JPEGs.

Every image is read, hashed (SHA-256, perceptual hash) and decoded, without the screening cache, first by this
process alone (FINETUNE_WORKERS=1) then by the pool (as many workers as cores), in turn `--repeats` times; the
median of each and their ratio, measured in the same run. The facts must be identical.
Run: python benchmarks/bench_screen.py [--images 3000] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.doctor import examine_all
from finetune.data.parallel import screening_workers


def _write_images(folder: Path, count: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(count):
        small = np.roll(base, i, axis=0) ^ np.uint8(i % 251)
        picture = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        path = folder / f"img{i:06d}.jpg"
        picture.save(path, quality=90)
        paths.append(str(path))
    return paths


def _timed(paths: list[str], workers: str) -> tuple[float, list]:
    os.environ["FINETUNE_WORKERS"] = workers
    start = time.perf_counter()
    facts = examine_all(paths, progress=False, cache=None)
    return time.perf_counter() - start, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = str(screening_workers())
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_images(Path(tmp), args.images, args.size)
        one, pool = [], []
        for _ in range(args.repeats):
            t1, f1 = _timed(paths, "1")
            tn, fn = _timed(paths, cores)
            if f1 != fn:
                raise SystemExit("the pool's facts differ from one process's")
            one.append(t1)
            pool.append(tn)
    m1, mn = statistics.median(one), statistics.median(pool)
    print(f"{args.images} images of {args.size} px, {cores} workers against 1 process, median of {args.repeats}:")
    print(f"  one process {m1:.2f} s ({args.images / m1:.0f} images/s)   pool {mn:.2f} s ({args.images / mn:.0f} images/s)")
    print(f"  speed-up {m1 / mn:.2f}x")


if __name__ == "__main__":
    main()
