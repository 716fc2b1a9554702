"""The training split of a shard folder as a stream: whole tar files read in sequence, WebDataset's shuffle buffer
mixes their images, its splitters share the shards among processes and loader workers, and each epoch holds exactly
as many images (and batches) as the folder's train split.

What an epoch reads depends only on its seed (the recipe's seed and the epoch number), the process's rank and the
number of loader workers: the order of the shards, the shuffle buffer's draws and the augmentation are all seeded, so
a run resumed at an epoch boundary reads what an uninterrupted run reads. Inside an epoch the buffer's state is not
saved: finetune checkpoints at epoch ends only, so an interrupted epoch is read again from its start. Changing
`data.num_workers` between a run and its resume changes which worker reads which shard, hence the order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import webdataset as wds

from finetune.data.decode import decode_bytes
from finetune.data.loader import RANK_SEED_STRIDE, EpochPlan, batches_per_epoch
from finetune.data.shards import decode_sample
from finetune.errors import DataError

SHUFFLE_BUFFER = 1000  # images held for shuffling: the order is mixed within about this many images across shards
TAR_BLOCK = 512
READ_BUFFER = 2**20  # a shard is read front to back: large reads
WORKER_SEED_STRIDE = 104_729  # a prime: each loader worker's shuffle buffer draws its own stream


def batch_sizes(images: int, plan: EpochPlan) -> list[int]:
    """The size of every batch one process draws in an epoch: the folder loader's count (`batches_per_epoch`)."""
    per_rank = -(-images // plan.world)
    batches = batches_per_epoch(images, plan.batch_size, world=plan.world, drop_lone_last=plan.drop_lone_last)
    return [min(plan.batch_size, per_rank - b * plan.batch_size) for b in range(batches)]


def worker_quotas(sizes: Sequence[int], capacities: Sequence[int]) -> list[int]:
    """Images each loader worker yields in an epoch: every batch (the last one may be short) goes whole to the worker
    with the most unread images left, so each worker's count is whole batches but one and no worker reads an image
    twice while another has some left (a DataLoader batches inside each worker and goes on with the others when
    one is done, so the epoch's batches are exactly `sizes`)."""
    left = list(capacities)
    quotas = [0] * len(left)
    for size in sorted(sizes, reverse=True):  # the short batch last: a worker's own last batch is its short one
        worker = max(range(len(left)), key=lambda w: (left[w], -w))
        quotas[worker] += size
        left[worker] -= size
    return quotas


def check_shards_per_process(shards: int, world: int) -> None:
    """Every process of a torchrun job streams its own train shards: refuse fewer shards than processes."""
    if shards < world:
        raise DataError(
            f"{shards} train shard(s) for {world} processes: every process needs one; "
            "write the shards again with a smaller --shard-size"
        )


class ShardStream(torch.utils.data.IterableDataset):
    """(tensor, class index) pairs streamed from the train shards, `len()` images per epoch (from shards.json).

    `for_epoch` gives the stream of one epoch; make_loader calls it with the epoch's seed, rank and batch size.
    `paths` is empty: nothing keyed by image file (the feature caches) applies to a stream.
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int],
        targets: Sequence[int],
        transform: Callable[..., Any],
        *,
        buffer: int = SHUFFLE_BUFFER,
        plan: EpochPlan | None = None,
    ) -> None:
        self.urls, self.counts, self.targets = list(urls), list(counts), list(targets)
        self.transform = transform
        self.buffer = buffer
        self.plan = plan
        self.paths: list[str] = []
        self.images = sum(self.counts)

    def __len__(self) -> int:
        """The split's images; for one epoch's stream (`for_epoch`), the images this process reads in it."""
        return self.images if self.plan is None else sum(batch_sizes(self.images, self.plan))

    def for_epoch(self, plan: EpochPlan) -> ShardStream:
        """This stream as one epoch reads it on one process."""
        check_shards_per_process(len(self.urls), plan.world)
        return ShardStream(self.urls, self.counts, self.targets, self.transform, buffer=self.buffer, plan=plan)

    def shards_per_rank(self) -> int:
        """The fewest shards any process reads: at most that many loader workers have something to read."""
        return len(self.urls) // (self.plan.world if self.plan is not None else 1)

    def _rank_shards(self, plan: EpochPlan, rng: random.Random) -> list[str]:
        """This epoch's shard order, then this process's share (WebDataset's splitter: it reads the rank from
        torch.distributed or torchrun's RANK and WORLD_SIZE, which finetune's rank equals)."""
        order = list(self.urls)
        if plan.shuffle:
            rng.shuffle(order)
        return list(wds.split_by_node(iter(order))) if plan.world > 1 else order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        plan = self.plan or EpochPlan(shuffle=False)  # a stream iterated without make_loader: every image once, in order
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(plan.seed)
        mine = self._rank_shards(plan, rng)
        count = dict(zip(self.urls, self.counts))
        capacities = [sum(count[url] for url in mine[w::workers]) for w in range(workers)]  # split_by_worker's shares
        quota = worker_quotas(batch_sizes(self.images, plan), capacities)[worker]
        shards = list(wds.split_by_worker(iter(mine))) if workers > 1 else mine
        buffer_rng = random.Random(rng.randrange(2**31) + RANK_SEED_STRIDE * plan.rank + WORKER_SEED_STRIDE * worker)
        samples = _passes(shards, buffer=self.buffer if plan.shuffle else 0, rng=buffer_rng)
        for sample in itertools.islice(samples, quota):
            data, target, key = decode_sample(sample)
            pixels = decode_bytes(data, where=f"{key} in {sample.get('__url__')}")
            yield self.transform(image=pixels)["image"], target


def _passes(urls: list[str], *, buffer: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """The samples of `urls`, shuffled through a buffer of `buffer` images (0: in order), pass after pass: a process
    whose shards hold fewer images than its share of the epoch reads them again (the epoch's length is fixed, the
    shards' sizes are not). Each pass is shuffled on its own, so no image comes twice before all came once."""
    while urls:
        samples: Iterator[dict[str, Any]] = (sample for url in urls for sample in tar_samples(url))
        if buffer:
            samples = wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(samples)
        yield from samples


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order, as WebDataset's `tarfile_to_samples` gives them ({'__key__', '__url__',
    extension: bytes}), read in one sequential pass. The headers are parsed here, not by Python's tarfile: the shards
    `finetune shard` writes are plain ustar (short names, whole-second times), and tarfile's per-member work made
    reading a shard slower than opening every image file (benchmarks/bench_shards.py: 7x faster this way)."""
    sample: dict[str, Any] = {}
    with open(url, "rb", buffering=READ_BUFFER) as handle:
        while len(header := handle.read(TAR_BLOCK)) == TAR_BLOCK and header != bytes(TAR_BLOCK):
            if header[156:157] not in (b"0", b"\0"):
                raise DataError(
                    f"shard {url} holds a tar entry of type {header[156:157]!r}, not an image file; shard the images again"
                )
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            try:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                raise DataError(f"shard {url} has a broken tar header at {name!r}; shard the images again") from None
            data = handle.read(size)
            handle.seek(-size % TAR_BLOCK, 1)  # the padding to the next 512-byte block
            key, _, extension = name.partition(".")
            if key != sample.get("__key__"):
                if sample:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[extension] = data
    if sample:
        yield sample
