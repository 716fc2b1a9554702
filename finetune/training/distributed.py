"""Data-parallel training under torchrun: a thin layer over torch.distributed and DistributedDataParallel.

`torchrun --nproc_per_node=N -m finetune train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `setup` joins
the process group (nccl on CUDA, gloo on CPU) and logs the rank, world size, backend and device. Every
rank reads the same data and recipe; training batches are sharded with a DistributedSampler, validation
is split across ranks and gathered, and only rank 0 writes files. With one process (N=1) there is no
group to join: the run is a plain single-process one, and the log says so.

Across machines (`torchrun --nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT`, the same line on each) the
ranks are global: rank 0 is one process of one machine and the only writer, so `--data` and `--out` must name the
same files on every machine (a shared disk); tests/test_distributed.py runs two such nodes on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from finetune.data.loader import shard_indices
from finetune.errors import TrainingError
from finetune.inference.device import check_device, resolve_device

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


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def _training_device(device: str) -> torch.device:
    """The device this process trains on, CUDA with its index (the one `torch.cuda.set_device` chose)."""
    chosen = resolve_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return chosen


def setup(device: str) -> Ranks:
    """Join the torchrun process group (once per process); a no-op outside torchrun and for a lone process."""
    if _joined():
        return current()
    if not launched():
        if "WORLD_SIZE" in os.environ:  # torchrun with one process: no group, and NCCL would gain nothing
            check_device(device)
            log.info("torchrun with one process: rank 0 of 1, no process group joined; training on %s", _training_device(device))
        return Ranks()
    check_device(device)
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    ranks = current()
    where = _training_device(device) if cuda else torch.device("cpu")
    log.info("rank %d of %d joined (%s) on %s%s", ranks.rank, ranks.world, dist.get_backend(), where, _node(ranks))
    return ranks


def _node(ranks: Ranks) -> str:
    """', node 0 of 2 machines (1 process each)' when torchrun spans several nodes; '' on one."""
    here = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    if here >= ranks.world:
        return ""
    return f", node {os.environ.get('GROUP_RANK', '?')} of {ranks.world // max(here, 1)} ({here} process(es) each)"


def current() -> Ranks:
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size()) if _joined() else Ranks()


@contextlib.contextmanager
def peers_watched(ranks: Ranks, *, run: Path) -> Iterator[None]:
    """Under torchrun, a collective that fails because another process died or became unreachable (gloo's
    "Connection closed by peer", NCCL's errors, a lost rendezvous store) ends this process with one line saying how
    to go on (resume the run folder `run`), not PyTorch's traceback."""
    try:
        yield
    except RuntimeError as exc:
        if not ranks.enabled or not _lost_peer(exc):
            raise
        raise TrainingError(
            f"another process of this torchrun job stopped or became unreachable ({_gist(exc)}); the epochs finished "
            f"before it are checkpointed: run the same torchrun command with 'finetune train --resume {run}' on every node"
        ) from None


def _gist(exc: RuntimeError) -> str:
    """The first sentence of PyTorch's message, without gloo's "[source.cc:561] " prefix."""
    lines = str(exc).strip().splitlines()
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0] if lines else ""
    return first[:160] or type(exc).__name__


def _lost_peer(exc: RuntimeError) -> bool:
    """A failure of the process group itself (PyTorch raises these as RuntimeError or its Dist* subclasses)."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset")
    )


def teardown() -> None:
    if _joined():
        dist.destroy_process_group()


def barrier() -> None:
    if _joined():
        dist.barrier()


def mean_across(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Average per-rank values (ranks see equal shares of the training set, so this is the global mean)."""
    if not ranks.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in (tensor / ranks.world).tolist()]


def gather_logits(logits: np.ndarray, targets: np.ndarray, ranks: Ranks, *, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's shard of validation outputs reassembled in dataset order (see `shard_indices`)."""
    if not ranks.enabled:
        return logits, targets
    pieces: list[Any] = [None] * ranks.world
    dist.all_gather_object(pieces, (logits, targets))
    width = next(piece[0].shape[1] for piece in pieces if len(piece[0]))
    sample = next(np.asarray(piece[1]) for piece in pieces if len(piece[1]))  # class indices, or multi-hot rows
    full_logits = np.zeros((total, width), dtype=np.float32)
    full_targets = np.zeros((total, *sample.shape[1:]), dtype=sample.dtype)
    for rank, (rank_logits, rank_targets) in enumerate(pieces):
        index = list(shard_indices(total, rank=rank, world=ranks.world))
        full_logits[index], full_targets[index] = rank_logits, rank_targets
    return full_logits, full_targets
