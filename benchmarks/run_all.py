"""Every figure in BENCHMARKS.md, in one run (about 35 minutes on a 2-core CPU), as a table of target, ratio and verdict.

Run from the repository root: python benchmarks/run_all.py [--out benchmarks/results.md]
Each benchmark compares finetune with a bare PyTorch baseline measured in the same process and
prints its own details first; medians over repeats. Needs ../shared/datasets/hymenoptera.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_amp  # noqa: E402
import bench_cache  # noqa: E402
import bench_cache_layout  # noqa: E402
import bench_data  # noqa: E402
import bench_demo  # noqa: E402
import bench_export  # noqa: E402
import bench_flops  # noqa: E402
import bench_levers  # noqa: E402
import bench_loops  # noqa: E402
import bench_memory  # noqa: E402
import bench_peers  # noqa: E402
import bench_predict  # noqa: E402
import bench_prefix  # noqa: E402
import bench_shards  # noqa: E402
import bench_startup  # noqa: E402

SUITE = [  # (name, callable); the whole run takes about 35 minutes on a 2-core CPU (the peer and prefix runs are long)
    ("loops", lambda: bench_loops.run(repeats=5)),
    ("data", lambda: bench_data.run(images=96, repeats=3)),
    ("flops", lambda: bench_flops.run(batch=16, repeats=3)),
    ("amp", lambda: bench_amp.run(repeats=5)),
    ("memory", lambda: bench_memory.run(repeats=2)),
    ("cache", lambda: bench_cache.run(epochs=4)),
    ("cache_layout", lambda: bench_cache_layout.run(rows=50_000)),
    ("export", lambda: bench_export.run(repeats=3)),
    ("levers", lambda: bench_levers.run(repeats=5)),
    ("prefix", lambda: bench_prefix.run(epochs=3)),
    ("demo", lambda: bench_demo.run(repeats=2)),
    ("startup", lambda: bench_startup.run(repeats=5)),
    ("predict", lambda: bench_predict.run(repeats=2)),
    ("shards", lambda: bench_shards.run(repeats=3)),
    ("peers", lambda: bench_peers.run(epochs=2, repeats=2)),
]


def table(rows: list[dict]) -> str:
    lines = ["| figure | measured | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(f"| {row['figure']} | {row['measured']} | {row['ratio']:.3g} | {row['target']} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=[name for name, _ in SUITE], help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    if not bench_data.DATA.is_dir():
        raise SystemExit(f"{bench_data.DATA} not found: the benchmarks read the hymenoptera photos")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    rows = []
    for name, bench in SUITE:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        begun = time.perf_counter()
        rows += bench()
        print(f"   ({time.perf_counter() - begun:.0f} s)", flush=True)
    header = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    result = f"{header}\n\n{table(rows)}\n"
    print("\n" + result)
    if args.out:
        args.out.write_text(result, encoding="utf-8")


if __name__ == "__main__":
    main()
