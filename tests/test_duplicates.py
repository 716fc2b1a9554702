"""The duplicate search: multi-index hashing finds the same near pairs as comparing every hash with every other, and
equal hashes are one group, listed up to a cap (thousands of blank frames are not millions of pairs)."""

from __future__ import annotations

import time
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune.data.doctor import check_dataset, format_check
from finetune.data.duplicates import duplicate_pairs, pair_count
from finetune.data.facts import ImageFacts
from finetune.data.hashindex import brute_force_pairs, hash_groups, near_pairs


def _planted(n: int, seed: int) -> np.ndarray:
    """n random 64-bit hashes, plus a copy of a third of them with 1-7 bits flipped (near pairs at every distance)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    near = codes[: n // 3].copy()
    for k in range(len(near)):
        for bit in rng.choice(64, rng.integers(1, 8), replace=False):
            near[k] ^= np.uint64(1) << np.uint64(bit)
    return np.concatenate([codes, near])


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 4, 5, 6, 9])
def test_index_finds_what_brute_force_finds(radius):
    distinct, _ = hash_groups(_planted(1500, seed=radius))
    found, reference = near_pairs(distinct, radius=radius), brute_force_pairs(distinct, radius=radius)
    assert all(np.array_equal(f, r) for f, r in zip(found, reference))
    assert radius == 0 or len(found[0]) >= 1500 // 3 * min(radius, 7) // 8  # the planted pairs are there


def _facts(phashes: list[int], digests: list[str]) -> list[ImageFacts]:
    return [ImageFacts(problem=None, sha256=d, phash=p) for p, d in zip(phashes, digests)]


def _brute_listing(samples: pd.DataFrame, facts: list[ImageFacts], across: str | None) -> list[tuple[str, str]]:
    pairs = []
    for a, b in combinations(range(len(facts)), 2):
        if bin(facts[a].phash ^ facts[b].phash).count("1") > 4:  # type: ignore[operator]
            continue
        x, y = samples.iloc[a], samples.iloc[b]
        if across == "split" and not (x["split"] != y["split"] and x["split"] and y["split"]):
            continue
        if across == "label" and x["label"] == y["label"]:
            continue
        pairs.append((x["path"], y["path"]))
    return pairs


@pytest.mark.parametrize("across", [None, "split", "label"])
def test_listing_equals_every_pair_for_small_groups_and_counts_large_ones(across):
    rng = np.random.default_rng(7)
    base = [int(h) for h in rng.integers(0, 2**63, 30, dtype=np.int64)]
    phashes = [base[0]] * 12 + [base[1] ^ 1] * 3 + [base[1]] * 2 + base[2:]  # a group, two near groups, lone hashes
    phashes += [base[2] ^ 0b111]  # a near copy of a lone hash
    digests = [f"d{i % 3}" if i < 12 else f"e{i}" for i in range(len(phashes))]
    n = len(phashes)
    samples = pd.DataFrame(
        {
            "path": [f"img_{i:02d}.png" for i in range(n)],
            "label": rng.choice(["a", "b"], n),
            "split": rng.choice(["train", "val", "test", ""], n),
        }
    )
    facts = _facts(phashes, digests)
    expected = _brute_listing(samples, facts, across)
    listed = duplicate_pairs(samples, facts, across=across)
    assert list(zip(listed["path_a"], listed["path_b"])) == expected and pair_count(listed) == len(expected)
    capped = duplicate_pairs(samples, facts, across=across, listed=2)
    assert pair_count(capped) == len(expected) and capped.groupby("group").size().max() <= 2
    assert set(zip(capped["path_a"], capped["path_b"])) <= set(expected)


def test_many_equal_hashes_are_one_group_in_seconds():
    n = 20_000  # blank frames: one perceptual hash; listing every pair would be 2*10^8 rows
    samples = pd.DataFrame({"path": [f"blank_{i}.png" for i in range(n)], "label": "empty", "split": ["train", "val"] * (n // 2)})
    facts = _facts([0] * n, ["same"] * n)
    started = time.perf_counter()
    pairs = duplicate_pairs(samples, facts)
    leaks = duplicate_pairs(samples, facts, across="split")
    assert time.perf_counter() - started < 30  # a regression bound (about a second on 2 cores), not a benchmark
    assert len(pairs) == 100 and pairs["group"].nunique() == 1 and pair_count(pairs) == n * (n - 1) // 2
    assert len(leaks) == 100 and pair_count(leaks) == (n // 2) ** 2 and leaks["crosses_split"].all()


def test_a_folder_of_blank_frames_is_one_group_in_check(tmp_path):
    blank = Image.new("RGB", (16, 16), (0, 0, 0))
    for split, count in (("train", 200), ("val", 100)):
        for label in ("empty", "deer"):
            (tmp_path / split / label).mkdir(parents=True)
        for i in range(count):
            blank.save(tmp_path / split / "empty" / f"frame_{i:03d}.png")
        for i in range(3):
            Image.fromarray(np.random.default_rng(count + i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / split / "deer" / f"deer_{i}.png"
            )
    started = time.perf_counter()
    result = check_dataset(tmp_path, extensions=[".png"], progress=False)
    assert time.perf_counter() - started < 120  # generous: the old search took seconds here, minutes at 3,000
    blank_rows = result.duplicates[result.duplicates["path_a"].str.contains("frame_")]
    assert blank_rows["group"].nunique() == 1 and len(blank_rows) <= 100
    assert result.summary["leaking_pairs"] == 200 * 100
    group = result.findings[result.findings["kind"] == "large duplicate group"]
    assert len(group) == 1 and group["detail"].iloc[0].startswith(
        f"300 images with one perceptual hash: {300 * 299 // 2} duplicate pairs"
    )
    assert (result.findings["kind"] == "exact duplicate across splits (leakage)").sum() == 1  # shown though capped
    assert "20000 duplicate pair(s) across splits" in format_check(result)
