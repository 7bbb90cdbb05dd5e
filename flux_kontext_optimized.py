"""FLUX.1-Kontext inference service.

    uvicorn flux_kontext_optimized:app --host 0.0.0.0 --port 8000
    python flux_kontext_optimized.py [serve|generate|benchmark] [--model SOURCE] ...

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


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(create_app(_settings(args)), host=args.host, port=args.port, log_config=None)
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
    from flux_kontext.schemas import InferenceRequest
    from flux_kontext.service import to_job

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
