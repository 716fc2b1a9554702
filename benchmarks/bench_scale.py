"""Cost at scale (issue 25): `finetune check` and one linear-probe epoch at 32 px on generated folders of small images.

For each size N a folder of N random 24 px PNGs in 10 class folders is written (and, with --blank-share, a copy where
that share of the images are one identical grey frame, as camera-trap "empty" classes are); then, each in a fresh
process with a cold screening and feature cache, screening alone (`examine_all`, what check and train screen with),
`finetune check` and `finetune train linear_probe` for one epoch at 32 px (ResNet-18, random weights: no hub). Wall time and peak RSS per command (GNU time), and the cost ratios between the
sizes and between the blank and clean folders, all measured in the same run.
Run: python benchmarks/bench_scale.py [--sizes 10000 100000] [--blank-share 0.1] [--only screening check epoch]
The 1,000,000-image run: python benchmarks/bench_scale.py --sizes 100000 1000000 --blank-share 0 (about 30 min with
check and the epoch, ~5 GB disk; --only screening: 10 min).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
PARTS = ["screening", "check", "epoch"]


def write_folder(root: Path, count: int, *, blank_share: float, seed: int = 0) -> None:
    """`count` 24 px PNGs of random pixels in CLASSES folders; `blank_share` of them one identical grey frame."""
    rng = np.random.default_rng(seed)
    blanks = set(rng.choice(count, int(count * blank_share), replace=False).tolist()) if blank_share else set()
    grey = Image.new("RGB", (24, 24), (96, 96, 96))
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        picture = grey if i in blanks else Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
        picture.save(root / f"class{i % CLASSES}" / f"img{i:07d}.png", compress_level=1)


def measured(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in GiB of one command (GNU time), which must succeed (check may exit 1)."""
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], env=env, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    wall, kib = result.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kib) / 2**20


SCREEN = (  # screening alone, as check and train do it (worker processes, the screening cache), in a fresh process
    "import sys; from pathlib import Path; from finetune.data.doctor import examine_all; "
    "from finetune.data.facts import FactsCache; paths = sorted(str(p) for p in Path(sys.argv[1]).rglob('*.png')); "
    "print(len(examine_all(paths, progress=False, cache=FactsCache.default())))"
)


def run_size(tmp: Path, count: int, *, blank_share: float, only: set[str]) -> dict[str, tuple[float, float]]:
    folder = tmp / f"data-{count}-{blank_share}"
    write_folder(folder, count, blank_share=blank_share)
    os.sync()  # the folder's dirty pages on disk now, not written back while the first command is timed
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp / f"cache-{count}-{blank_share}")}
    finetune = [sys.executable, "-m", "finetune"]
    costs = {}
    if "screening" in only:  # a cache of its own: check below starts cold too
        screen_env = {**env, "FINETUNE_CACHE_DIR": str(tmp / f"cache-screen-{count}-{blank_share}")}
        costs["screening"] = measured([sys.executable, "-c", SCREEN, str(folder)], screen_env)
    if "check" in only:
        costs["check"] = measured([*finetune, "check", str(folder), "-q"], env)
    if "epoch" in only:
        costs["linear-probe epoch"] = measured(
            [*finetune, "train", "linear_probe", "--data", str(folder), "--out", str(tmp / f"run-{count}-{blank_share}"),
             "--model", "resnet18", "--set", "model.pretrained=false", "--set", "transforms.input_size=32",
             "--set", "data.batch_size=256", "--epochs", "1", "-q"],
            env,
        )  # fmt: skip
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--blank-share", type=float, default=0.1, help="also measure the largest size with this share blank")
    parser.add_argument("--no-train", action="store_true", help="leave out the linear-probe epoch")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="what to measure (default: all)")
    args = parser.parse_args()
    only = set(args.only) - ({"epoch"} if args.no_train else set())
    results: dict[tuple[int, float], dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for count in args.sizes:
            results[(count, 0.0)] = run_size(Path(tmp), count, blank_share=0.0, only=only)
            print(count, "clean", results[(count, 0.0)], flush=True)
        if args.blank_share:
            big = (args.sizes[-1], args.blank_share)
            results[big] = run_size(Path(tmp), big[0], blank_share=big[1], only=only)
            print(big[0], "blank", results[big], flush=True)
    print("\n| images | blank share | command | wall s | peak GiB |\n|---:|---:|---|---:|---:|")
    for (count, share), costs in results.items():
        for name, (wall, gib) in costs.items():
            print(f"| {count:,} | {share:.0%} | {name} | {wall:.1f} | {gib:.2f} |")
    small, large = args.sizes[0], args.sizes[-1]
    for name in results[(large, 0.0)]:
        ratio = results[(large, 0.0)][name][0] / results[(small, 0.0)][name][0]
        print(f"{name}: {large:,}/{small:,} images cost {ratio:.1f}x the time")
        if args.blank_share:
            blank = results[(large, args.blank_share)][name][0] / results[(large, 0.0)][name][0]
            print(f"{name}: {args.blank_share:.0%} blank frames cost {blank:.2f}x the clean folder")


if __name__ == "__main__":
    main()
