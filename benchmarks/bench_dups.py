"""The duplicate search (finetune/data/doctor.py `duplicate_pairs`) on synthetic perceptual hashes, no images.

Random 64-bit hashes at N = 10k, 100k, 1M, 1% of them near copies (multi-index hashing over the distinct hashes, then
the listing), the old O(N^2) search (a copy of it below: every hash against every later one, one dict per pair) at the
two smallest N and on 500 blank frames, and 3,000 and 20,000 identical hashes (blank frames): one group, 100 pairs listed.
Wall time and peak traced memory (tracemalloc, which sees numpy's buffers) of one call each.
Run: python benchmarks/bench_dups.py [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from finetune.data.duplicates import duplicate_pairs, pair_count
from finetune.data.facts import ImageFacts


def old_duplicate_pairs(samples: pd.DataFrame, facts: Sequence[ImageFacts], *, max_distance: int = 4) -> pd.DataFrame:
    """The search before multi-index hashing (kept as the baseline): O(N^2) comparisons, every pair listed."""
    usable = [(i, f) for i, f in enumerate(facts) if f.problem is None and f.phash is not None]
    rows = []
    if usable:
        index = np.array([i for i, _ in usable])
        hashes = np.array([f.phash for _, f in usable], dtype=np.uint64)
        digests = [f.sha256 for _, f in usable]
        for a in range(len(usable) - 1):
            distance = np.bitwise_count(hashes[a] ^ hashes[a + 1 :])
            for offset in np.nonzero(distance <= max_distance)[0]:
                b = a + 1 + int(offset)
                i, j = index[a], index[b]
                kind = "exact duplicate" if digests[a] == digests[b] else "near duplicate"
                rows.append(
                    {
                        "path_a": samples.at[i, "path"],
                        "path_b": samples.at[j, "path"],
                        "kind": kind,
                        "distance": int(distance[offset]),
                        "split_a": samples.at[i, "split"],
                        "split_b": samples.at[j, "split"],
                        "label_a": samples.at[i, "label"],
                        "label_b": samples.at[j, "label"],
                    }
                )
    frame = pd.DataFrame(rows, columns=["path_a", "path_b", "kind", "distance", "split_a", "split_b", "label_a", "label_b"])
    frame["crosses_split"] = (frame["split_a"] != frame["split_b"]) & (frame["split_a"] != "") & (frame["split_b"] != "")
    return frame


def _random(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random 64-bit hashes, 1% of them near copies of others (1-4 bits flipped), so there is something to find."""
    codes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    copies = rng.choice(n, n // 100, replace=False)
    for k in copies:
        flips = sum(1 << int(bit) for bit in rng.choice(64, rng.integers(1, 5), replace=False))
        codes[k] = codes[(k + 1) % n] ^ np.uint64(flips)
    return codes


def _data(hashes: np.ndarray) -> tuple[pd.DataFrame, list[ImageFacts]]:
    n = len(hashes)
    samples = pd.DataFrame({"path": [f"img_{i}.jpg" for i in range(n)], "label": "a", "split": ["train", "val"] * (n // 2)})
    facts = [ImageFacts(problem=None, sha256=f"{h:016x}", phash=int(h)) for h in hashes]
    return samples, facts


def _measure(search: Callable[..., pd.DataFrame], hashes: np.ndarray) -> tuple[float, float, int, int]:
    samples, facts = _data(hashes)
    tracemalloc.start()
    started = time.perf_counter()
    pairs = search(samples, facts)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    groups = int(pairs["group"].nunique()) if "group" in pairs.columns else len(pairs)
    return seconds, peak, pair_count(pairs), groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases: list[tuple[str, str, Callable[..., pd.DataFrame], np.ndarray]] = []
    for n in args.sizes:
        cases.append(("random", f"{n:,}", duplicate_pairs, _random(rng, n)))
    for _, n, _, hashes in sorted(cases, key=lambda case: len(case[3]))[:2]:  # the same hashes, the old way
        cases.append(("random", n, old_duplicate_pairs, hashes))
    for n in (3_000, 20_000):
        cases.append(("blank frames", f"{n:,}", duplicate_pairs, np.zeros(n, dtype=np.uint64)))
    cases.append(("blank frames", "500", old_duplicate_pairs, np.zeros(500, dtype=np.uint64)))
    print("| data | N | search | wall s | peak MiB | pairs found | listed as |")
    print("|---|---:|---|---:|---:|---:|---|")
    for name, n, search, hashes in cases:
        seconds, peak, pairs, groups = _measure(search, hashes)
        old = search is old_duplicate_pairs
        listing = f"{pairs:,} rows" if old else f"{groups:,} group(s), <= 100 rows each"
        kind = "old, every pair" if old else "multi-index hash"
        print(f"| {name} | {n} | {kind} | {seconds:.2f} | {peak:.0f} | {pairs:,} | {listing} |", flush=True)


if __name__ == "__main__":
    main()
