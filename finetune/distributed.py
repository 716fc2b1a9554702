"""Data-parallel training under torchrun: a thin layer over torch.distributed and DistributedDataParallel.

`torchrun --nproc_per_node=N -m finetune train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `setup` joins
the process group (nccl on CUDA, gloo on CPU). Every rank reads the same data and recipe; training
batches are sharded with a DistributedSampler, validation is split across ranks and gathered, and
only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from finetune.errors import RecipeError
from finetune.inference import Predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; the default is a plain single-process run."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> Ranks:
    """Join the torchrun process group (once per process); a no-op outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return Ranks()
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise RecipeError("train.device is cuda but no GPU is visible; use train.device: cpu (gloo) for CPU processes")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    ranks = current()
    log.info("rank %d of %d joined (%s)", ranks.rank, ranks.world, dist.get_backend())
    return ranks


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    return Ranks()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Average per-rank values (ranks see equal shares of the training set, so this is the global mean)."""
    if not ranks.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / ranks.world).tolist()


def shard(total: int, ranks: Ranks) -> range:
    """This rank's share of `total` items for evaluation (strided, no padding, so nothing is counted twice)."""
    return range(ranks.rank, total, ranks.world)


def gather_predictions(part: Predictions, loss: float, ranks: Ranks, *, paths: list[str]) -> tuple[Predictions, float]:
    """Every rank's shard of predictions reassembled in dataset order, and the mean loss over all of them."""
    if not ranks.enabled:
        return part, loss
    pieces: list = [None] * ranks.world
    dist.all_gather_object(pieces, (part.probs, part.targets, loss * len(part.targets) if len(part.targets) else 0.0))
    probs = np.zeros((len(paths), pieces[0][0].shape[1]), dtype=np.float32)
    targets = np.zeros(len(paths), dtype=np.int64)
    for rank, (rank_probs, rank_targets, _) in enumerate(pieces):
        index = list(shard(len(paths), Ranks(rank=rank, world=ranks.world)))
        probs[index], targets[index] = rank_probs, rank_targets
    total_loss = sum(piece[2] for piece in pieces)
    return Predictions(paths=list(paths), probs=probs, targets=targets), total_loss / max(len(paths), 1)
