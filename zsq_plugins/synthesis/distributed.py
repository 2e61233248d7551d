"""Generation under torchrun / torch.distributed: one disjoint share of the batches per rank.

No process pool of our own: ``torchrun --nproc_per_node=N`` starts the
processes, gloo (CPU) or NCCL (CUDA) connects them, and the shared cache folder carries the
shards. Batch ``i`` goes to rank ``i % world`` and is seeded by (seed, i) alone, so the merged
set equals a single-process run with the same seed and batch schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank


def join_from_environment(device: torch.device) -> RankInfo:
    """Joins the process group that torchrun describes (``WORLD_SIZE`` > 1), once; a plain
    single process gets rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    if world <= 1:
        return RankInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    log.info("joined %s process group as rank %d of %d", backend, dist.get_rank(), world)
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def rank_device(device: torch.device, info: RankInfo) -> torch.device:
    """``cuda`` without an index means this rank's own GPU (LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and info.is_distributed:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: RankInfo) -> None:
    if info.is_distributed:
        dist.barrier()
