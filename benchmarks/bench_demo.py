"""`finetune demo` as a new user runs it: a fresh process, an empty cache folder, the wall clock around the whole
command. Goal (issue 16): test accuracy >= 0.99 in <= 30 s on 2 cores. Prints the demo's own time breakdown.
Run: python benchmarks/bench_demo.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command() -> list[str]:
    """The `finetune` script beside this Python (a venv's bin/), else `python -m finetune`."""
    script = Path(sys.executable).with_name("finetune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "finetune"]


def demo_once() -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FINETUNE_CACHE_DIR": str(Path(tmp) / "cache")}
        finetune = command()
        started = time.perf_counter()
        done = subprocess.run(
            [*finetune, "demo", "--out", str(Path(tmp) / "demo"), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"finetune demo failed: {done.stderr.strip()[-500:]}")
        accuracy = json.loads((Path(tmp) / "demo" / "report" / "metrics.json").read_text())["accuracy"]
        line = next(line for line in done.stdout.splitlines() if line.startswith("demo:"))
    return wall, accuracy, line


def run(*, repeats: int = 2) -> list[dict]:
    results = [demo_once() for _ in range(repeats)]
    for wall, _, line in results:
        print(f"  wall {wall:.1f} s | {line}")
    wall = statistics.median(r[0] for r in results)
    accuracy = min(r[1] for r in results)
    return [
        {
            "figure": "finetune demo wall time, fresh process and cache / 30 s",
            "measured": f"{wall:.1f} s (median of {repeats})",
            "ratio": wall / 30,
            "target": "<= 1",
            "met": wall <= 30,
        },
        {
            "figure": "finetune demo test accuracy / 0.99",
            "measured": f"{accuracy:.4f} on 270 digits",
            "ratio": accuracy / 0.99,
            "target": ">= 1",
            "met": accuracy >= 0.99,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    run(repeats=parser.parse_args().repeats)


if __name__ == "__main__":
    main()
