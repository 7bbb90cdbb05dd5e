"""The store and the process groups of one parallel service.

Rank 0 hosts a TCPStore on FLUX_PARALLEL_PORT (MASTER_ADDR or 127.0.0.1); the others connect to it. It carries the
jobs and the heartbeats (control.py), and the rendezvous of two process groups: ``compute`` (NCCL on GPUs, gloo on
CPUs) for the all-to-alls and the gather, and ``control``, a gloo group for the per-step agreement (a few bytes on
the host, so the GPU queue is never synchronised for it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from flux_kontext.parallel.ranks import RankEnvironment

log = logging.getLogger(__name__)

# NVLink multicast (NVLS) off on the lent machines (docs/FACTS.md); set before NCCL initializes, inherited by ranks
# rank 0 spawns.
NCCL_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class ParallelGroup:
    ranks: RankEnvironment
    backend: str
    store: dist.Store
    compute: object  # the torch process group of the collectives
    control: object  # a gloo group on the host

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend, "launcher": self.ranks.launcher}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def connect_store(ranks: RankEnvironment, port: int, timeout_s: float) -> dist.Store:
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return dist.TCPStore(
        host,
        port,
        ranks.world_size,
        is_master=ranks.leader,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def join_group(ranks: RankEnvironment, store: dist.Store, device, timeout_s: float) -> ParallelGroup:
    """Every rank calls this (``device``: its torch.device); returns once all have joined (or raises after
    ``timeout_s``)."""
    for name, value in NCCL_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg", store), rank=ranks.rank, world_size=ranks.world_size, timeout=timeout
    )
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    log.info("rank %d of %d joined the %s process group", ranks.rank, ranks.world_size, backend)
    return ParallelGroup(ranks, backend, store, dist.group.WORLD, control)
