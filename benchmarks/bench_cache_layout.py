"""The feature cache's layout on disk: a .npy file per (image, view) (the layout before issue 25, its write and read
code copied here as the baseline) against shards of rows with an index (`FeatureCache`'s own writer and reader).

Writes N random rows of D float32 values under SHA-256 keys into an empty folder with each layout, then reads them
all back validated (as a cached run does: every row checked finite; the per-file reader also checks each file's type
and shape, the shard reader each shard's size against its index), and counts the files. Both layouts write
atomically with an fsync per file, as the cache does. Reads run on a warm page cache (the files were just written;
dropping the page cache would disturb the other users of this machine), so they measure the per-file overhead, not
a disk's seeks; on a cold network disk the gap is wider.
Run: python benchmarks/bench_cache_layout.py [--rows 50000] [--dim 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from finetune.files import atomic_write
from finetune.training.feature_store import SHARD_ROWS, FeatureCache, _ShardWriter


def _save_row(row: np.ndarray) -> Callable[[BinaryIO], None]:  # the old layout's writer, as it was
    return lambda handle: np.save(handle, row, allow_pickle=False)


def _read_row(path: Path, size: int, dtype: type[np.floating]) -> np.ndarray | None:  # the old layout's reader
    try:
        row = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    good = isinstance(row, np.ndarray) and row.dtype == dtype and row.shape == (size,) and bool(np.isfinite(row).all())
    return row if good else None


def per_file(folder: Path, keys: list[str], rows: np.ndarray) -> tuple[float, float, np.ndarray]:
    started = time.perf_counter()
    for key, row in zip(keys, rows):
        atomic_write(folder / key[:2] / f"{key}.v0.npy", _save_row(np.ascontiguousarray(row)))
    written = time.perf_counter()
    read = [_read_row(folder / key[:2] / f"{key}.v0.npy", rows.shape[1], np.float32) for key in keys]
    if any(row is None for row in read):
        raise SystemExit("the per-file layout lost a row")
    back = np.stack([row for row in read if row is not None])
    return written - started, time.perf_counter() - written, back


def sharded(folder: Path, keys: list[str], rows: np.ndarray) -> tuple[float, float, np.ndarray]:
    cache = FeatureCache(folder, views=0)
    started = time.perf_counter()
    writer = _ShardWriter(cache)
    for key, row in zip(keys, rows):
        writer.add((key, 0), np.ascontiguousarray(row))
    writer.close()
    written = time.perf_counter()
    out = np.empty_like(rows)
    wanted = {(key.encode(), 0): [i] for i, key in enumerate(keys)}  # as FeatureCache.features builds it
    cache._read(wanted, out)
    if wanted:
        raise SystemExit(f"the sharded layout lost {len(wanted)} rows")
    return written - started, time.perf_counter() - written, out


def _files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def run(*, rows: int = 50_000, dim: int = 512) -> list[dict]:
    data = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        old_write, old_read, old_back = per_file(Path(tmp) / "files", keys, data)
        old_files = _files(Path(tmp) / "files")
        new_write, new_read, new_back = sharded(Path(tmp) / "shards", keys, data)
        new_files = _files(Path(tmp) / "shards")
    if not (np.array_equal(old_back, data) and np.array_equal(new_back, data)):
        raise SystemExit("a layout read back other rows than it wrote")
    print(f"{rows:,} rows of {dim} float32 ({rows * dim * 4 / 2**20:.0f} MiB), shards of {SHARD_ROWS} rows")
    print(f"  a file per row: write {old_write:.2f} s, read {old_read:.2f} s, {old_files:,} files")
    print(f"  shards:         write {new_write:.2f} s, read {new_read:.2f} s, {new_files:,} files")
    return [
        {
            "figure": f"cache write, a file per row / shards ({rows:,} x {dim} float32)",
            "measured": f"{old_write:.2f} s / {new_write:.2f} s",
            "ratio": old_write / new_write,
            "target": "> 1",
            "met": old_write > new_write,
        },
        {
            "figure": f"cache read, a file per row / shards ({rows:,} x {dim}, warm page cache)",
            "measured": f"{old_read:.2f} s / {new_read:.2f} s",
            "ratio": old_read / new_read,
            "target": "> 1",
            "met": old_read > new_read,
        },
        {
            "figure": f"cache files on disk, a file per row / shards ({rows:,} rows)",
            "measured": f"{old_files:,} / {new_files:,}",
            "ratio": old_files / new_files,
            "target": "O(rows / shard size)",
            "met": new_files <= 2 * -(-rows // SHARD_ROWS),
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    for row in run(rows=args.rows, dim=args.dim):
        print(f"{row['figure']}: {row['measured']} -> {row['ratio']:.3g} (target {row['target']})")


if __name__ == "__main__":
    main()
