"""A follower rank's main: ``python -m flux_kontext.parallel.follower`` (spawned by rank 0) or, under torchrun,
``flux_kontext_optimized.py serve`` on a rank other than 0.

A follower does not outlive rank 0: its heartbeat thread writes to rank 0's store, and exits the process when that
fails (PR_SET_PDEATHSIG would not do: it follows the spawning *thread*, rank 0's model loader, which ends).
"""

from __future__ import annotations

import sys


def main(settings=None) -> int:
    from flux_kontext.logging_setup import configure_logging
    from flux_kontext.parallel.engines import FollowerEngine
    from flux_kontext.parallel.ranks import rank_environment
    from flux_kontext.settings import Settings

    configure_logging()
    settings = settings or Settings()
    return FollowerEngine(settings, rank_environment(settings)).serve()


if __name__ == "__main__":
    sys.exit(main())
