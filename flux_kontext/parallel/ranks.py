"""Which rank this process is, how many there are, how they were launched, and each rank's device.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK for every process; FLUX_PARALLEL=N makes rank 0 start the other
N - 1 itself (launch.py), which get the same variables and FLUX_PARALLEL_LAUNCHER=spawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

LAUNCHER_VARIABLE = "FLUX_PARALLEL_LAUNCHER"


@dataclass(frozen=True)
class RankEnvironment:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "spawn" | "single"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def rank_environment(settings, environ=os.environ) -> RankEnvironment:
    """This process's place: from torchrun's (or our spawner's) variables, else FLUX_PARALLEL with this process as
    rank 0. A FLUX_PARALLEL that disagrees with torchrun's WORLD_SIZE is a configuration error."""
    if "WORLD_SIZE" in environ and "RANK" in environ:
        world = int(environ["WORLD_SIZE"])
        if settings.parallel not in (1, world):
            raise ValueError(f"FLUX_PARALLEL={settings.parallel} but WORLD_SIZE={world} (torchrun): leave one unset")
        launcher = environ.get(LAUNCHER_VARIABLE, "torchrun")
        rank = int(environ["RANK"])
        return RankEnvironment(rank, world, int(environ.get("LOCAL_RANK", rank)), launcher)
    if settings.parallel == 1:
        return RankEnvironment(0, 1, 0, "single")
    return RankEnvironment(0, settings.parallel, 0, "spawn")


def rank_settings(settings, ranks: RankEnvironment):
    """The settings of one rank: its own GPU (cuda:LOCAL_RANK where the device is auto or cuda), and no warm-up of
    its own on the followers (they run rank 0's warm-up generations, which rank 0 sends them)."""
    update: dict = {}
    if settings.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            update["device"] = f"cuda:{ranks.local_rank}"
    if not ranks.leader:
        update["warmup"] = False
    return settings.model_copy(update=update)
