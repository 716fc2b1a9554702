"""`finetune predict` on a folder of 10,000 small images against 1,000: it must stream (peak memory about the same)
and keep its throughput; each size runs in a fresh process (peak RSS from the kernel), median of repeats.

The run: recipes/quickstart.yaml trained for 1 epoch on the digits demo folder (32 px PNGs). The folders hold
hard links to the digits' PNGs, repeated to the wanted count.
Targets (issue 16): peak RSS at 10k / at 1k <= 1.2 (constant memory); throughput at 10k >= 0.9x that at 1k.
Run: python benchmarks/bench_predict.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune import train
from finetune.data.demo import build_digits_folder, default_paths

# peak RSS from VmHWM: unlike ru_maxrss, it starts afresh at exec (ru_maxrss keeps the forking parent's peak)
CHILD = """
import json, sys, time
started = time.perf_counter()
from finetune import predict
table = predict(run=sys.argv[1], inputs=[sys.argv[2]], out=sys.argv[3], progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(table),
                  "peak_mib": int(status["VmHWM"].split()[0]) / 1024}))
"""


def image_folder(source: Path, target: Path, count: int) -> Path:
    """`count` hard links (copies where links fail) to the PNGs under `source`, in one flat folder."""
    target.mkdir(parents=True)
    pictures = sorted(source.rglob("*.png"))
    for i, picture in zip(range(count), itertools.cycle(pictures)):
        try:
            os.link(picture, target / f"img_{i:05d}.png")
        except OSError:
            (target / f"img_{i:05d}.png").write_bytes(picture.read_bytes())
    return target


def predict_once(run: Path, folder: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(run), str(folder), str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(*, small: int = 1_000, large: int = 10_000, repeats: int = 2) -> list[dict]:
    recipe, _ = default_paths()
    with tempfile.TemporaryDirectory() as tmp:
        digits = build_digits_folder(Path(tmp) / "digits")
        trained = train(recipe=recipe, data=digits, out=Path(tmp) / "run", overrides=["train.epochs=1"], progress=False)
        folders = {n: image_folder(digits, Path(tmp) / f"images_{n}", n) for n in (small, large)}
        results: dict[int, list[dict]] = {small: [], large: []}
        for _ in range(repeats):
            for n in (small, large):
                results[n].append(predict_once(trained.run_dir, folders[n], Path(tmp) / f"p{n}.csv"))
    peak = {n: statistics.median(r["peak_mib"] for r in results[n]) for n in results}
    speed = {n: statistics.median(r["rows"] / r["seconds"] for r in results[n]) for n in results}
    for n in (small, large):
        print(f"predict {n:>6,} images: {speed[n]:.0f} img/s (whole command, import included), peak RSS {peak[n]:.0f} MiB")
    return [
        {
            "figure": f"predict peak RSS, {large:,} / {small:,} images (32 px, streaming)",
            "measured": f"{peak[large]:.0f} vs {peak[small]:.0f} MiB",
            "ratio": peak[large] / peak[small],
            "target": "<= 1.2",
            "met": peak[large] / peak[small] <= 1.2,
        },
        {
            "figure": f"predict throughput, {large:,} / {small:,} images (whole command)",
            "measured": f"{speed[large]:.0f} vs {speed[small]:.0f} img/s",
            "ratio": speed[large] / speed[small],
            "target": ">= 0.9",
            "met": speed[large] / speed[small] >= 0.9,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run(small=args.small, large=args.large, repeats=args.repeats)


if __name__ == "__main__":
    main()
