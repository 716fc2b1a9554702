"""Instant answers (issue 16): `finetune --help` and `--version` (lazy imports), and how long a recipe asking for
hub weights takes to fail offline on the hymenoptera folder (the weights are checked before any image is read;
0.1 took 42.7 s, after decoding every image). Fresh processes, medians.
Run: python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def command() -> list[str]:
    """The `finetune` script beside this Python (a venv's bin/), else `python -m finetune`."""
    script = Path(sys.executable).with_name("finetune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "finetune"]


def _seconds(args: list[str], repeats: int, expect: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != expect:
            raise SystemExit(f"{' '.join(args)} exited {done.returncode}, expected {expect}: {done.stderr.strip()[-300:]}")
    return statistics.median(times)


def run(*, repeats: int = 5) -> list[dict]:
    finetune = command()
    help_s = _seconds([*finetune, "--help"], repeats, 0)
    version_s = _seconds([*finetune, "--version"], repeats, 0)
    with tempfile.TemporaryDirectory() as tmp:
        offline = [*finetune, "train", "recipes/last_stage.yaml", "--data", str(DATA), "--out", f"{tmp}/run"]
        offline_s = _seconds([*offline, "--set", "model.pretrained=true"], max(2, repeats // 2), 2)
    print(f"--help {help_s:.2f} s, --version {version_s:.2f} s, offline pretrained error {offline_s:.1f} s (0.1: 42.7 s)")
    return [
        {
            "figure": "finetune --help (fresh process)",
            "measured": f"{help_s:.2f} s",
            "ratio": help_s,
            "target": "< 1 s",
            "met": help_s < 1,
        },
        {
            "figure": "offline `pretrained: true` error on hymenoptera, seconds / 0.1's 42.7 s",
            "measured": f"{offline_s:.1f} s (--version {version_s:.2f} s)",
            "ratio": offline_s / 42.7,
            "target": "< 0.25 (before any image)",
            "met": offline_s / 42.7 < 0.25,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    run(repeats=parser.parse_args().repeats)


if __name__ == "__main__":
    main()
