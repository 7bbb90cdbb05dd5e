"""FLUX.1-Kontext inference service.

    uvicorn flux_kontext_optimized:app --host 0.0.0.0 --port 8000
    python flux_kontext_optimized.py [serve|generate|benchmark] [--model SOURCE] ...

Under an orchestrator use ``serve``: on SIGTERM/SIGINT it drains (readiness 503 with the listener still open, new
requests 503, accepted jobs finish within FLUX_DRAIN_TIMEOUT_S) and exits 0. Plain uvicorn closes the listener first.

Settings come from FLUX_* environment variables (see flux_kontext/settings.py); --model overrides FLUX_MODEL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from flux_kontext import cli
from flux_kontext.logging_setup import configure_logging

log = logging.getLogger("flux_kontext")

configure_logging()


def __getattr__(name: str):
    """``app`` is built on first use (``uvicorn flux_kontext_optimized:app``), so that the command line's --help and
    its path checks answer without importing torch and building an engine."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from flux_kontext.service import create_app

    application = globals()["app"] = create_app()
    return application


SHUTDOWN_GRACE_S = 5.0  # after the drain: the last responses' encoding and sending, then the lifespan shutdown


def _serve(args: argparse.Namespace) -> int:
    import os
    import signal

    import uvicorn

    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: ranks other than 0 run jobs, rank 0 serves HTTP
        from flux_kontext.parallel.follower import main as follower

        return follower(cli.settings_for(args))

    from flux_kontext.service import create_app, refuse_several_workers

    try:
        if args.workers != 1:
            raise RuntimeError(f"--workers {args.workers}: one worker process per GPU only")
        refuse_several_workers()
        settings = cli.settings_for(args)
    except (RuntimeError, cli.UsageError) as exc:
        log.error("%s", exc)
        return 2
    application = create_app(settings)
    service = application.state.service

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that the first SIGTERM/SIGINT drains the service while the listener stays open (probes
        see readiness 503, new requests get a 503 envelope); only then does uvicorn stop, and the exit status is 0
        (the signal is not re-raised). A second signal ends the drain at once (what is left is answered 503)."""

        loop: asyncio.AbstractEventLoop | None = None
        drain: asyncio.Future | None = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            if self.loop is None or self.should_exit:
                self.should_exit = True
                return
            log.warning("%s received: draining", signal.Signals(sig).name)
            self.loop.call_soon_threadsafe(self._drain_then_exit)

        def _drain_then_exit(self) -> None:
            if self.drain is not None:
                service.hurry()
                return

            async def run() -> None:
                try:
                    await service.drain()
                finally:
                    self.should_exit = True

            self.drain = asyncio.ensure_future(run())

    config = uvicorn.Config(
        application,
        host=args.host,
        port=args.port,
        log_config=None,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
    )
    DrainingServer(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, __doc__, serve=_serve)


if __name__ == "__main__":
    sys.exit(main())
