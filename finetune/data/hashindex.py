"""Near-duplicate search on 64-bit perceptual hashes, sub-quadratic: multi-index hashing over the distinct hashes.

Equal hashes are grouped first (a thousand blank frames are one hash, one group), so the index holds each distinct
hash once. The 64 bits are cut into 3 bands; two hashes within `radius` bits differ by at most `radius // 3` bits in
at least one band (pigeonhole), so every band is looked up with its own key and the keys within that many flipped
bits, and each candidate pair is verified with a popcount. A band of 21-22 bits is a direct table (O(1) lookups)
and holds few random keys per bucket even at 10^6 hashes, so the cost grows about linearly with the number of
distinct hashes (see benchmarks/bench_dups.py).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

_CHUNK = 1 << 18  # queries per lookup step: bounds the candidate arrays held at once
_BANDS = 3  # of 21-22 bits: a direct table per band (4M entries) and few random keys per bucket even at 10^6


def hash_groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct hashes (sorted) and, for every input position, the index of its distinct hash."""
    distinct, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    return distinct, inverse.reshape(-1)


def _flips(width: int, within: int) -> np.ndarray:
    """Every mask of at most `within` set bits among the low `width` bits (0 first)."""
    masks = [0]
    for k in range(1, within + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def near_pairs(distinct: np.ndarray, *, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of positions in `distinct` (pairwise different hashes) whose Hamming distance is at most `radius`,
    with those distances; sorted by (i, j)."""
    codes = np.asarray(distinct, dtype=np.uint64)
    n = len(codes)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2 or radius < 1:
        return empty, empty.copy(), empty.copy()
    m = _BANDS
    within = radius // m
    edges = np.linspace(0, 64, m + 1).astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        keys = ((codes >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        # a direct table over the band's 2^width keys (<= 22 bits: 4M entries): bucket start and size in O(1)
        sizes = np.bincount(keys, minlength=1 << int(hi - lo)).astype(np.int32)
        firsts = (np.cumsum(sizes, dtype=np.int64) - sizes).astype(np.int32)
        for flip in _flips(int(hi - lo), within).astype(np.int64):
            for start in range(0, n, _CHUNK):
                query = np.arange(start, min(start + _CHUNK, n))
                wanted = keys[query] ^ flip
                left, count = firsts[wanted], sizes[wanted]
                if not count.any():
                    continue
                a = np.repeat(query, count)
                offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
                b = order[np.repeat(left.astype(np.int64), count) + offsets]
                keep = a < b  # each pair once (the flip from b's side finds it as well); a == b is the key itself
                a, b = a[keep], b[keep]
                close = np.bitwise_count(codes[a] ^ codes[b]) <= radius
                found.append(a[close].astype(np.int64) * n + b[close])
    if not found:
        return empty, empty.copy(), empty.copy()
    pairs = np.unique(np.concatenate(found))
    i, j = pairs // n, pairs % n
    return i, j, np.bitwise_count(codes[i] ^ codes[j]).astype(np.int64)


def brute_force_pairs(distinct: np.ndarray, *, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same answer as `near_pairs`, by comparing every hash with every later one (O(N^2): the reference)."""
    codes = np.asarray(distinct, dtype=np.uint64)
    rows_i, rows_j = [], []
    for a in range(len(codes) - 1):
        hits = np.nonzero(np.bitwise_count(codes[a] ^ codes[a + 1 :]) <= radius)[0] + a + 1
        rows_i.append(np.full(len(hits), a, dtype=np.int64))
        rows_j.append(hits.astype(np.int64))
    if not rows_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    i, j = np.concatenate(rows_i), np.concatenate(rows_j)
    return i, j, np.bitwise_count(codes[i] ^ codes[j]).astype(np.int64)
