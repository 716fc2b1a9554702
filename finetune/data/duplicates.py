"""Duplicate images: exact (same bytes) and near (perceptual hash within a Hamming radius), found in one sub-quadratic
search (finetune/data/hashindex.py) and listed as pairs, at most `LISTED_PER_GROUP` per group of look-alikes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, islice, product

import numpy as np
import pandas as pd

from finetune.data.facts import ImageFacts
from finetune.data.hashindex import hash_groups, near_pairs

PAIR_COLUMNS = ["path_a", "path_b", "kind", "distance", "split_a", "split_b", "label_a", "label_b"]
LISTED_PER_GROUP = 100  # pairs listed per group of duplicates; its `group_pairs` says how many it holds in all


@dataclass(frozen=True)
class DuplicateGroups:
    """The whole duplicate search, done once (`find_duplicate_groups`), listed as pairs by `list_pairs`: the images
    (positions into the facts) of every perceptual hash that 2+ images share, and the links between distinct hashes
    within the Hamming radius."""

    same: list[np.ndarray]  # the images of one perceptual hash, ascending
    near: list[tuple[np.ndarray, np.ndarray, int]]  # the images of two hashes within the radius, and their distance


def find_duplicate_groups(facts: Sequence[ImageFacts], *, max_distance: int = 4) -> DuplicateGroups:
    """Group equal perceptual hashes, then link the distinct ones within `max_distance` bits through a multi-index
    hash (finetune/data/hashindex.py): sub-quadratic, and a folder of identical blank frames is one group."""
    usable = np.array([i for i, f in enumerate(facts) if f.problem is None and f.phash is not None], dtype=np.int64)
    if not len(usable):
        return DuplicateGroups(same=[], near=[])
    distinct, inverse = hash_groups(np.array([facts[i].phash for i in usable], dtype=np.uint64))
    ordered = usable[np.argsort(inverse, kind="stable")]  # images by hash; a hash's own run of them, ascending
    counts = np.bincount(inverse, minlength=len(distinct))
    starts = np.cumsum(counts) - counts

    def members(h: int) -> np.ndarray:  # one hash's images, sliced when asked (not a million tiny arrays up front)
        return ordered[starts[h] : starts[h] + counts[h]]

    a, b, distance = near_pairs(distinct, radius=max_distance)
    return DuplicateGroups(
        same=sorted((members(int(h)) for h in np.nonzero(counts > 1)[0]), key=lambda m: int(m[0])),
        near=[(members(i), members(j), int(d)) for i, j, d in zip(a, b, distance)],
    )


def _within(
    members: np.ndarray, values: np.ndarray | None, listed: int, variety: np.ndarray
) -> tuple[int, list[tuple[int, int]]]:
    """Pairs among one hash's images (only those whose `values` differ, when given): how many, and the first
    `listed` in (a, b) order, found in O(listed x images) however large the group. A group too large to list whole
    (with no `values`) shows the pairs between its first image of each split and label first (`variety`), so a
    capped listing still shows its leakage and its conflicting labels."""
    own = None if values is None else values[members]
    if own is None:
        total = len(members) * (len(members) - 1) // 2
    else:
        counts = np.unique(own, return_counts=True)[1].astype(np.int64)
        total = (len(members) ** 2 - int((counts**2).sum())) // 2
    shown: list[tuple[int, int]] = []
    if own is None and total > listed:
        firsts = members[np.sort(np.unique(variety[members], return_index=True)[1])]
        shown = [(int(x), int(y)) for x, y in islice(combinations(firsts, 2), listed)]
    seen = set(shown)
    for a in range(len(members) - 1):
        if len(shown) >= listed or not total:
            break
        later = members[a + 1 :] if own is None else members[a + 1 :][own[a + 1 :] != own[a]]
        if not len(later):
            break  # every later image shares this one's value, hence each later one's later images share theirs
        more = [(int(members[a]), int(b)) for b in later[: listed - len(shown) + len(seen)]]
        shown += [pair for pair in more if pair not in seen][: listed - len(shown)]
    return total, shown


def _between(first: np.ndarray, second: np.ndarray, values: np.ndarray | None, listed: int) -> tuple[int, list[tuple[int, int]]]:
    """Pairs between two near hashes' images (only those whose `values` differ, when given): how many, and the
    first `listed`."""
    classes = (
        [(first, second)]
        if values is None
        else [(first[values[first] == v], second[values[second] != v]) for v in np.unique(values[first])]
    )
    total = sum(len(mine) * len(theirs) for mine, theirs in classes)
    shown = [(int(x), int(y)) for mine, theirs in classes for x, y in islice(product(mine, theirs), listed)]
    return total, sorted((min(p), max(p)) for p in shown)[:listed]


def list_pairs(
    samples: pd.DataFrame,
    facts: Sequence[ImageFacts],
    groups: DuplicateGroups,
    *,
    across: str | None = None,
    listed: int = LISTED_PER_GROUP,
) -> pd.DataFrame:
    """The duplicate pairs of `groups` (only those whose `across` column differs, e.g. "split" or "label", when
    given), at most `listed` per group: `group` numbers the groups (the images of one perceptual hash, or of two near
    ones) and `group_pairs` says how many such pairs the group holds, listed or not (`pair_count` adds them up)."""
    values = None if across is None else samples[across].to_numpy().astype(str)
    variety = (samples["split"].astype(str) + "\0" + samples["label"].astype(str)).to_numpy()
    same, near = groups.same, groups.near
    if values is not None and across == "split":  # an unsplit image (split "") crosses nothing
        same = [m[values[m] != ""] for m in same]
        near = [(a[values[a] != ""], b[values[b] != ""], d) for a, b, d in near]
    rows: list[tuple[int, int, int, int, int]] = []  # a, b, distance, group, group_pairs
    for members in same:
        total, shown = _within(members, values, listed, variety) if len(members) > 1 else (0, [])
        rows += [(a, b, 0, len(rows), total) for a, b in shown]  # a group's number: its first row's (renumbered below)
    for first, second, distance in near:
        if len(first) == 1 and len(second) == 1:  # the common case: one pair, no bookkeeping
            a, b = sorted((int(first[0]), int(second[0])))
            if values is None or values[a] != values[b]:
                rows.append((a, b, distance, len(rows), 1))
            continue
        total, shown = _between(first, second, values, listed)
        start = len(rows)
        rows += [(a, b, distance, start, total) for a, b in shown]
    return _pair_frame(samples, facts, rows)


def _pair_frame(samples: pd.DataFrame, facts: Sequence[ImageFacts], rows: list[tuple[int, int, int, int, int]]) -> pd.DataFrame:
    table = np.array(rows, dtype=np.int64).reshape(-1, 5)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    a, b = table[:, 0], table[:, 1]
    digests = np.array([f.sha256 for f in facts], dtype=object)
    frame = pd.DataFrame(
        {
            "path_a": samples["path"].to_numpy()[a],
            "path_b": samples["path"].to_numpy()[b],
            "kind": np.where(digests[a] == digests[b], "exact duplicate", "near duplicate") if len(a) else [],
            "distance": table[:, 2],
            "split_a": samples["split"].to_numpy()[a],
            "split_b": samples["split"].to_numpy()[b],
            "label_a": samples["label"].to_numpy()[a],
            "label_b": samples["label"].to_numpy()[b],
        },
        columns=PAIR_COLUMNS,
    )
    frame["crosses_split"] = (frame["split_a"] != frame["split_b"]) & (frame["split_a"] != "") & (frame["split_b"] != "")
    frame["group"] = pd.factorize(table[:, 3])[0] if len(table) else np.zeros(0, dtype=np.int64)  # by first listed pair
    frame["group_pairs"] = table[:, 4]
    return frame


def pair_count(pairs: pd.DataFrame) -> int:
    """How many duplicate pairs `pairs` stands for: each group's `group_pairs` once (a listing made before groups
    existed, e.g. an old leakage.csv, has a row per pair)."""
    if "group_pairs" not in pairs.columns:
        return len(pairs)
    return int(pairs.drop_duplicates("group")["group_pairs"].sum())


def duplicate_pairs(
    samples: pd.DataFrame,
    facts: Sequence[ImageFacts],
    *,
    max_distance: int = 4,
    across: str | None = None,
    listed: int = LISTED_PER_GROUP,
) -> pd.DataFrame:
    """Exact (same bytes) and near (perceptual hash within `max_distance` bits) duplicate pairs, with their splits,
    at most `listed` per group of duplicates (see `list_pairs`)."""
    groups = find_duplicate_groups(facts, max_distance=max_distance)
    return list_pairs(samples, facts, groups, across=across, listed=listed)
