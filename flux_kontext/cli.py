"""The command line: ``python flux_kontext_optimized.py [serve|generate|benchmark]`` (serve itself, the draining
uvicorn server, lives in flux_kontext_optimized.py).

``generate`` checks its paths and validates the request exactly as POST /inference does BEFORE the model loads (a
wrong path or field costs seconds, not a model load: exit status 2 and one line saying what to fix), runs no warm-up
unless ``--warmup`` (a one-shot call would pay for generations it throws away), and shows the denoising steps: a
progress bar on a terminal, one line per step otherwise (logs, CI). ``benchmark`` prints a table, or ``--json``.

Exit status: 0 done, 1 the model could not load or the generation failed, 2 a usage error (argparse's too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from flux_kontext.schedulers import SCHEDULERS  # names only: no torch

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line the user can fix (exit status 2, no traceback)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, except where there is none (the help then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class StepProgress:
    """The denoising steps of one job on stderr: a tqdm bar on a terminal, a plain line per step otherwise.
    Called as the job's ``on_step(done, total)``."""

    def __init__(self, label: str = "denoising", stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.stream.isatty():
            self.stream.write(f"{self.label}: step {done}/{total}\n")
            self.stream.flush()
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="step", file=self.stream, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----- arguments -----------------------------------------------------------------------------------------------------
def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--model", help="hub id, local folder, 'random' or 'tiny' (default: FLUX_MODEL, else the hub)")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="start the HTTP service (the default)", formatter_class=HelpFormatter)
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="address to bind (HOST)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="port (PORT)")
    serve.add_argument("--workers", type=int, default=1, help="must be 1: one process per GPU")

    generate = sub.add_parser("generate", help="one generation to a file, no HTTP", formatter_class=HelpFormatter)
    add_generate_arguments(generate)

    bench = sub.add_parser(
        "benchmark", help="timed generations on the loaded model: a table", formatter_class=HelpFormatter
    )
    bench.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run")
    bench.add_argument("--width", type=int, default=1024, help="output width")
    bench.add_argument("--height", type=int, default=1024, help="output height")
    bench.add_argument("--steps", type=int, help="denoising steps (default: the scheduler's, 14 DPM / 28 euler)")
    bench.add_argument("--mode", choices=("edit", "text_to_image"), default="edit", help="with or without an input")
    bench.add_argument("--scheduler", choices=SCHEDULERS, help="default: the server's default (unipc when available)")
    bench.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    bench.add_argument("--out", help="also write the JSON report to this file")

    for sp in (serve, generate, bench):  # --model accepted before or after the subcommand
        sp.add_argument("--model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def add_generate_arguments(generate: argparse.ArgumentParser) -> None:
    """The fields of POST /inference, as flags named after them (same validation, same defaults)."""
    generate.add_argument("--prompt", required=True, help="the instruction (edit) or description (text-to-image)")
    generate.add_argument("--image", help="input image to edit (PNG, JPEG, WebP); omit for text-to-image")
    generate.add_argument(
        "--out", default="output.png", help="output file; with several images NAME-1.png, NAME-2.png, ..."
    )
    generate.add_argument(
        "--output-format", choices=("png", "jpeg", "webp"), help="default: from --out's suffix (.png .jpg .webp)"
    )
    generate.add_argument("--output-quality", type=int, help="JPEG/WebP quality 1-100 (default: 95)")
    generate.add_argument("--num-images", type=int, default=1, help="1-4; image i uses seed + i")
    generate.add_argument(
        "--width", type=int, help="default: an edit follows its input's aspect (snapped); text-to-image 1024"
    )
    generate.add_argument("--height", type=int, help="see --width")
    generate.add_argument("--aspect-ratio", help="W:H (16:9, ...) instead of --width/--height")
    generate.add_argument("--steps", type=int, help="denoising steps (default: 14 DPM, 28 euler)")
    generate.add_argument("--seed", type=int, help="default: random (each image's seed is printed)")
    generate.add_argument("--guidance-scale", type=float, default=3.5, help="distilled guidance")
    generate.add_argument("--negative-prompt", help="used with --true-cfg-scale above 1 (two passes per step)")
    generate.add_argument("--true-cfg-scale", type=float, default=1.0, help="true classifier-free guidance")
    generate.add_argument(
        "--cache-threshold",
        type=float,
        help="first-block cache threshold; 0 never skips (default: FLUX_CACHE_THRESHOLD, 0.12)",
    )
    generate.add_argument("--scheduler", choices=SCHEDULERS, help="default: unipc")
    generate.add_argument(
        "--warmup", action="store_true", help="run the service's warm-up generations first (and compile, on a GPU)"
    )


def main(argv: list[str] | None, description: str, serve: Callable[[argparse.Namespace], int]) -> int:
    parser = build_parser(description)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args([*argv, "serve"])
    handlers = {"serve": serve, "generate": generate, "benchmark": benchmark}
    return handlers[args.command](args)


def settings_for(args: argparse.Namespace, **overrides):
    """Settings from FLUX_* with the command line's overrides (--model); UsageError for a bad FLUX_* value."""
    from pydantic import ValidationError

    from flux_kontext.settings import Settings

    if getattr(args, "model", None):
        overrides["model"] = args.model
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise UsageError(f"settings: {validation_message(exc)}") from None


def validation_message(exc) -> str:
    """A pydantic error in one line, each field named as its flag (--num-images: ...)."""
    parts = []
    for error in exc.errors():
        field = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-") if error["loc"] else ""
        parts.append(f"{field}: {error['msg']}" if field else error["msg"])
    return "; ".join(parts)


def fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return USAGE_ERROR


# ----- generate ------------------------------------------------------------------------------------------------------
def check_input(path: str | None) -> bytes | None:
    if path is None:
        return None
    source = Path(path)
    if not source.exists():
        raise UsageError(f"--image {path}: no such file")
    if source.is_dir():
        raise UsageError(f"--image {path}: is a folder, not an image file")
    try:
        return source.read_bytes()
    except OSError as exc:
        raise UsageError(f"--image {path}: cannot be read ({exc.strerror})") from None


def output_paths(out: str, output_format: str | None, num_images: int) -> tuple[list[Path], str]:
    """The files to write and their format; the folder must exist and be writable (checked now, not after the
    generation)."""
    target = Path(out)
    suffix_format = SUFFIX_FORMATS.get(target.suffix.lower())
    if output_format is None:
        if suffix_format is None:
            raise UsageError(f"--out {out}: name it .png, .jpg or .webp, or give --output-format")
        output_format = suffix_format
    elif suffix_format is not None and suffix_format != output_format:
        raise UsageError(f"--out {out} is a {suffix_format} name but --output-format is {output_format}")
    folder = target.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder {folder} is not writable")
    if num_images == 1:
        paths = [target]
    else:
        paths = [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(1, num_images + 1)]
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--out {out}: {path} is a folder")
    return paths, output_format


def generate(args: argparse.Namespace) -> int:
    """One generation through the same request validation and conversion as POST /inference."""
    try:
        image = check_input(args.image)
        paths, output_format = output_paths(args.out, args.output_format, args.num_images)
        request = generate_request(args, image, output_format)
        settings = settings_for(args, warmup=args.warmup)
        job = to_engine_job(request, settings)
    except UsageError as exc:
        return fail(str(exc))
    engine = loaded_engine(settings)
    if not engine.ready:
        return 1
    result = run_with_progress(engine, job, StepProgress())
    if isinstance(result, int):
        return result
    from flux_kontext.image_encoding import ImageEncoder

    encoder = ImageEncoder.from_settings(settings)
    for path, picture, seed in zip(paths, result.images, result.seeds, strict=True):
        path.write_bytes(encoder.encode(picture, output_format, request.encoder_quality)[0])
        sys.stderr.write(f"wrote {path} ({picture.width}x{picture.height}, seed {seed})\n")
    sys.stderr.write(summary(result) + "\n")
    return 0


def summary(result) -> str:
    """What ran for this generation, as a response reports it."""
    parts = [f"{result.steps} steps {result.scheduler}", f"true CFG {'on' if result.true_cfg else 'off'}"]
    if result.first_block_cache:
        cache = result.first_block_cache
        parts.append(
            f"first-block cache {cache['threshold']}: {cache['computed']} computed, {cache['skipped']} skipped"
        )
    parts.append(f"ran: {', '.join(result.optimizations['ran']) or 'none'}")
    parts.append(f"engine {result.timings_ms['engine_total'] / 1000:.2f} s")
    return "; ".join(parts)


def generate_request(args: argparse.Namespace, image: bytes | None, output_format: str):
    import base64

    from pydantic import ValidationError

    from flux_kontext.schemas import InferenceRequest

    fields = {
        "prompt": args.prompt,
        "image": base64.b64encode(image).decode() if image is not None else None,
        "width": args.width,
        "height": args.height,
        "aspect_ratio": args.aspect_ratio,
        "steps": args.steps,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "true_cfg_scale": args.true_cfg_scale,
        "num_images": args.num_images,
        "cache_threshold": args.cache_threshold,
        "scheduler": args.scheduler,
        "output_format": output_format,
        "output_quality": args.output_quality,
    }
    try:
        return InferenceRequest(**{key: value for key, value in fields.items() if value is not None})
    except ValidationError as exc:
        raise UsageError(validation_message(exc)) from None


def to_engine_job(request, settings):
    """The request as an engine job (the image decoded and checked), before any model loads."""
    from flux_kontext.errors import ServiceError
    from flux_kontext.inference import to_job

    try:
        return to_job(request, settings)
    except ServiceError as exc:
        raise UsageError(f"--{exc.param or 'image'}: {exc.message}") from None


def loaded_engine(settings):
    from flux_kontext.engine import Engine

    engine = Engine(settings)
    engine.load()
    if not engine.ready:
        log.error("model failed to load: %s", engine.reason)
    return engine


def run_with_progress(engine, job, progress: StepProgress):
    """The job's result, or an exit status: 2 for what this server cannot do, 1 for running out of memory."""
    from flux_kontext.jobs import EngineOutOfMemory, JobRejected

    job.on_step = progress
    try:
        return engine.generate(job)
    except JobRejected as exc:
        return fail(str(exc))
    except EngineOutOfMemory as exc:
        log.error("%s", exc)
        return 1
    finally:
        progress.close()


# ----- benchmark -----------------------------------------------------------------------------------------------------
def benchmark(args: argparse.Namespace) -> int:
    from flux_kontext.benchmark import BenchmarkParams, format_table, run_benchmark

    try:
        settings = settings_for(args)
        if args.out and not Path(args.out).parent.is_dir():
            raise UsageError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
        check_benchmark_size(args.width, args.height, args.runs)
    except UsageError as exc:
        return fail(str(exc))
    params = BenchmarkParams(
        runs=args.runs, width=args.width, height=args.height, steps=args.steps, mode=args.mode, scheduler=args.scheduler
    )
    engine = loaded_engine(settings)
    if not engine.ready:
        return 1
    submitted = 0

    async def submit(job):
        nonlocal submitted
        submitted += 1
        kind = "warm-up" if submitted <= params.warmup_runs else f"run {submitted - params.warmup_runs}/{params.runs}"
        job.on_step = progress = StepProgress(kind)
        try:
            return engine.generate(job), 0.0
        finally:
            progress.close()

    report = asyncio.run(run_benchmark(engine, params, submit))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.write((text if args.json else format_table(report)) + "\n")
    return 0


def check_benchmark_size(width: int, height: int, runs: int) -> None:
    """The limits GET /benchmark's query enforces."""
    from flux_kontext.schemas import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE

    for flag, side in (("--width", width), ("--height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIZE_MULTIPLE:
            raise UsageError(f"{flag} {side}: {MIN_SIDE}-{MAX_SIDE}, a multiple of {SIZE_MULTIPLE}")
    if runs < 1:
        raise UsageError(f"--runs {runs}: at least 1")
