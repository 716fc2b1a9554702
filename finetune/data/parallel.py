"""Screening in worker processes: reading, hashing and decoding every image is independent per file and CPU-bound
(Pillow's decoders, SHA-256, the perceptual hash), so a large folder is examined by as many processes as the machine
has cores, in order, a chunk at a time (results stream back; no worker holds more than its chunk).

Small sets stay in this process: starting workers costs more than examining a few hundred images. Workers are
forked where the platform allows (as PyTorch's DataLoader does on Linux), so a user's script needs no
`if __name__ == "__main__"` guard; they touch no torch state, only files and the screening cache.
`FINETUNE_WORKERS=1` turns the pool off (and `FINETUNE_WORKERS=N` sets its size).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from finetune.data.facts import FactsCache, ImageFacts, examine_image
from finetune.errors import DataError

PARALLEL_FROM = 512  # fewer images than this are examined in this process


def screening_workers() -> int:
    """How many processes examine images: $FINETUNE_WORKERS, else the cores this process may use."""
    told = os.environ.get("FINETUNE_WORKERS", "").strip()
    if told:
        if not told.isdigit() or int(told) < 1:
            raise DataError(f"FINETUNE_WORKERS is '{told}'; set it to a whole number >= 1 (1 = no worker processes)")
        return int(told)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def examine_many(paths: Sequence[str], *, cache: FactsCache | None, workers: int | None = None) -> Iterator[ImageFacts]:
    """`examine_image` for every path, in order; by `workers` processes (default `screening_workers()`) when there
    are at least PARALLEL_FROM paths."""
    count = screening_workers() if workers is None else workers
    if count <= 1 or len(paths) < PARALLEL_FROM:
        yield from (examine_image(p, cache) for p in paths)
        return
    chunk = max(16, min(256, len(paths) // (count * 8)))
    with ProcessPoolExecutor(max_workers=count, mp_context=_context()) as pool:
        yield from pool.map(partial(examine_image, cache=cache), paths, chunksize=chunk)
