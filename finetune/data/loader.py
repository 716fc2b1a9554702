"""Serve decoded, transformed images as a torch Dataset and DataLoader whose randomness depends only on a seed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from finetune.data.decode import load_image
from finetune.errors import DataError

UNREADABLE = -2  # the target PictureDataset gives a file it could not decode (with unreadable="mark")
Target = int | np.ndarray  # a class index, or a multi-hot float32 row with several labels per image
RANK_SEED_STRIDE = 7919  # a prime: rank r draws augmentation with seed + r * stride, so ranks never share a stream


class ImageDataset(torch.utils.data.Dataset):
    """(tensor, class index) pairs; the transform is an albumentations Compose returning a tensor.

    `keep_decoded_mb` > 0 keeps decoded images (before the transform) in memory up to that size, so later epochs
    skip decoding; only useful when items are loaded in this process (num_workers 0), as workers start afresh.
    """

    def __init__(
        self, paths: Sequence[str], targets: Sequence[Target], transform: Callable[..., Any], *, keep_decoded_mb: float = 0.0
    ) -> None:
        self.paths = list(paths)
        self.targets = list(targets)
        self.transform = transform
        self._room = int(keep_decoded_mb * 2**20)
        self._kept: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, index: int) -> np.ndarray:
        kept = self._kept.get(index)
        if kept is None:
            kept = load_image(self.paths[index])
            if kept.nbytes <= self._room:
                self._kept[index] = kept
                self._room -= kept.nbytes
        return kept.copy()  # a transform never sees (or changes) the kept array itself

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self.transform(image=self._pixels(index))["image"], self.targets[index]


class PictureDataset(ImageDataset):
    """An ImageDataset whose items may also be RGB uint8 arrays already decoded (pictures given to `predict`).

    With `unreadable="mark"` a file that cannot be decoded yields a blank image and the target UNREADABLE instead of
    an error, so a long prediction streams in one pass and the caller drops (and lists) those rows.
    """

    def __init__(
        self,
        sources: Sequence[str | np.ndarray],
        targets: Sequence[Target],
        transform: Callable[..., Any],
        *,
        unreadable: str = "fail",
    ) -> None:
        super().__init__([s if isinstance(s, str) else "" for s in sources], targets, transform)
        self.sources = list(sources)
        self.unreadable = unreadable

    def _pixels(self, index: int) -> np.ndarray:
        source = self.sources[index]
        return source if isinstance(source, np.ndarray) else load_image(source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        try:
            return super().__getitem__(index)
        except DataError:
            if self.unreadable != "mark":
                raise
            return self.transform(image=np.zeros((8, 8, 3), dtype=np.uint8))["image"], UNREADABLE


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch is read on one process: its seed, shuffling, batch size and the processes reading beside it."""

    seed: int = 0
    shuffle: bool = True
    batch_size: int = 1
    rank: int = 0
    world: int = 1
    drop_lone_last: bool = False


def _seed_worker(worker_id: int) -> None:
    """Each worker seeds numpy and the pipeline from torch's per-worker seed (itself drawn from the loader's generator)."""
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def _lone_last(images: int, batch_size: int, world: int) -> bool:
    """True when one rank's last batch would hold a single image."""
    return batch_size > 1 and math.ceil(images / world) % batch_size == 1


def batches_per_epoch(images: int, batch_size: int, *, world: int = 1, drop_lone_last: bool = False) -> int:
    """Batches one rank draws from `images` (sharded over `world` ranks), without a lone last image when asked."""
    batches = math.ceil(math.ceil(images / world) / batch_size)
    return batches - int(drop_lone_last and _lone_last(images, batch_size, world))


def shard_indices(total: int, *, rank: int, world: int) -> range:
    """One rank's share of `total` items for evaluation (strided, no padding, so nothing is counted twice)."""
    return range(rank, total, world)


def _sampler(dataset: Any, *, shuffle: bool, balanced: bool, seed: int, rank: int, world: int, generator: torch.Generator) -> Any:
    """The sampler for one loader, or None for the DataLoader's own (shuffled or sequential) order."""
    if world > 1:
        if balanced:
            raise DataError(
                "data.sampler: weighted is not supported under torchrun; use sampler: shuffle with loss.class_weights"
            )
        if shuffle:
            return torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return shard_indices(len(dataset), rank=rank, world=world)
    if balanced:
        counts = np.bincount(dataset.targets)
        weights = [1.0 / float(counts[t]) for t in dataset.targets]
        return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True, generator=generator)
    return None


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    pin_memory: bool = False,
    balanced: bool = False,
    rank: int = 0,
    world: int = 1,
    drop_lone_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and augmentation depend only on `seed` (so resume is exact).

    `balanced` draws with replacement, each class equally likely (a WeightedRandomSampler).
    Under torchrun (`world` > 1) each rank reads its share: a DistributedSampler seeded with
    `seed` when shuffling (the same permutation on every rank), a strided slice otherwise.
    `drop_lone_last` leaves out a last batch of one image, which BatchNorm cannot normalise in train mode
    (that image is in another place of the next epoch's order).
    """
    stream = seed + RANK_SEED_STRIDE * rank  # augmentation differs per rank
    generator = torch.Generator().manual_seed(stream)
    sampler = None
    if hasattr(dataset, "for_epoch"):  # a stream of shards (data.stream.ShardStream) splits, shuffles and sizes its epochs
        if balanced:
            raise DataError("data.sampler: weighted needs random access to images; with shards use sampler: shuffle")
        plan = EpochPlan(seed=seed, shuffle=shuffle, batch_size=batch_size, rank=rank, world=world, drop_lone_last=drop_lone_last)
        dataset = dataset.for_epoch(plan)
        num_workers = min(num_workers, dataset.shards_per_rank())  # a worker without a shard would read nothing
        shuffle = drop_lone_last = False  # the stream's own; a DataLoader takes neither for an IterableDataset
    else:
        sampler = _sampler(dataset, shuffle=shuffle, balanced=balanced, seed=seed, rank=rank, world=world, generator=generator)
    if num_workers == 0 and hasattr(dataset.transform, "set_random_seed"):
        dataset.transform.set_random_seed(stream)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers else None,
        pin_memory=pin_memory,
        drop_last=drop_lone_last and _lone_last(len(dataset), batch_size, world),
    )
