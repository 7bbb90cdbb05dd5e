"""Starting a parallel service: which engine this process gets, and FLUX_PARALLEL=N's spawning of ranks 1..N-1.

    FLUX_PARALLEL=2 python flux_kontext_optimized.py serve          # rank 0 starts rank 1 itself
    torchrun --nproc-per-node 2 flux_kontext_optimized.py serve     # torchrun starts both; rank 0 serves HTTP

The spawned ranks leave when rank 0 dies (follower.py); under torchrun, torchrun tears the group down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flux_kontext.parallel.group import NCCL_ENVIRONMENT
from flux_kontext.parallel.ranks import LAUNCHER_VARIABLE, rank_environment

ROOT = Path(__file__).resolve().parents[2]  # the project: the package is imported from here


def engine_for(settings):
    """The engine of this process: the plain one, or rank 0's of a parallel service."""
    ranks = rank_environment(settings)
    if not ranks.parallel:
        from flux_kontext.engine import Engine

        return Engine(settings)
    if not ranks.leader:
        raise RuntimeError(f"rank {ranks.rank} serves no HTTP: start `flux_kontext_optimized.py serve` under torchrun")
    from flux_kontext.parallel.engines import LeaderEngine

    return LeaderEngine(settings, ranks)


def spawn_followers(world_size: int) -> dict[int, subprocess.Popen]:
    processes = {}
    for rank in range(1, world_size):
        environment = {
            **os.environ,
            **NCCL_ENVIRONMENT,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            LAUNCHER_VARIABLE: "spawn",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [sys.executable, "-m", "flux_kontext.parallel.follower"]
        processes[rank] = subprocess.Popen(command, cwd=ROOT, env=environment)
    return processes
