"""Seeds: every random draw of a run depends only on the recipe's seed, the epoch and the process's rank."""

from __future__ import annotations

import random

import numpy as np
import torch

from finetune.data.loader import RANK_SEED_STRIDE

EPOCH_SEED_STRIDE = 100_003  # a prime: epoch e of a run with seed s shuffles and augments with s * stride + e


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order, augmentation and (through `seed_epoch`) dropout."""
    return seed * EPOCH_SEED_STRIDE + epoch


def seed_epoch(seed: int, epoch: int, *, rank: int = 0) -> None:
    """Reseed the global generators at the start of an epoch, so dropout and any other draw inside the training
    step are the same whether the run went straight through or was resumed after a kill."""
    seed_everything(epoch_seed(seed, epoch) + RANK_SEED_STRIDE * rank)
