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
import json
import logging
import os
import sys
from pathlib import Path

from flux_kontext.logging_setup import configure_logging
from flux_kontext.service import create_app
from flux_kontext.settings import Settings

log = logging.getLogger("flux_kontext")

configure_logging()
app = create_app()


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(model=args.model) if args.model else Settings()


SHUTDOWN_GRACE_S = 5.0  # after the drain: the last responses' encoding and sending, then the lifespan shutdown


def _serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from flux_kontext.service import refuse_several_workers

    try:
        if args.workers != 1:
            raise RuntimeError(f"--workers {args.workers}: one worker process per GPU only")
        refuse_several_workers()
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    application = create_app(_settings(args))
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


def _loaded_engine(args: argparse.Namespace):
    from flux_kontext.engine import Engine

    engine = Engine(_settings(args))
    engine.load()
    if not engine.ready:
        log.error("model failed to load: %s", engine.reason)
    return engine


def _generate(args: argparse.Namespace) -> int:
    """One generation through the same request validation and conversion as POST /inference."""
    import base64

    from pydantic import ValidationError

    from flux_kontext.errors import ServiceError
    from flux_kontext.inference import to_job
    from flux_kontext.schemas import InferenceRequest

    fields = {
        "prompt": args.prompt,
        "image": base64.b64encode(Path(args.image).read_bytes()).decode() if args.image else None,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
    }
    try:
        request = InferenceRequest(**{key: value for key, value in fields.items() if value is not None})
        engine = _loaded_engine(args)
        if not engine.ready:
            return 1
        job = to_job(request, engine.settings)
    except (ValidationError, ServiceError) as exc:
        log.error("invalid request: %s", exc)
        return 2
    result = engine.generate(job)
    out = Path(args.out)
    result.images[0].save(out)
    log.info("wrote %s (%dx%d, seed %d): %s", out, result.width, result.height, result.seeds[0], result.timings_ms)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from flux_kontext.benchmark import BenchmarkParams, run_benchmark

    engine = _loaded_engine(args)
    if not engine.ready:
        return 1

    async def submit(job):
        return engine.generate(job), 0.0

    params = BenchmarkParams(
        runs=args.runs, width=args.width, height=args.height, steps=args.steps, mode=args.mode, scheduler=args.scheduler
    )
    report = asyncio.run(run_benchmark(engine, params, submit))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id, local folder, 'random' or 'tiny' (default: FLUX_MODEL)")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="start the HTTP service (the default)")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    serve.add_argument("--workers", type=int, default=1, help="must be 1: one process per GPU")

    generate = sub.add_parser("generate", help="one generation to a file, no HTTP")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--image", help="input image for editing; omit for text-to-image")
    generate.add_argument("--out", default="output.png")
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--guidance-scale", type=float, default=3.5)
    generate.add_argument("--scheduler", help="euler, dpmpp_2m or dpmpp_2m_karras (default: dpmpp_2m)")

    bench = sub.add_parser("benchmark", help="timed generations on the loaded model, JSON to stdout")
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--width", type=int, default=1024)
    bench.add_argument("--height", type=int, default=1024)
    bench.add_argument("--steps", type=int)
    bench.add_argument("--mode", choices=("edit", "text_to_image"), default="edit")
    bench.add_argument("--scheduler", help="default: the server's default (DPM when available)")
    bench.add_argument("--out", help="also write the JSON report here")

    for sp in (serve, generate, bench):  # --model accepted before or after the subcommand
        sp.add_argument("--model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args([*(argv or sys.argv[1:]), "serve"])
    handlers = {"serve": _serve, "generate": _generate, "benchmark": _benchmark}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
