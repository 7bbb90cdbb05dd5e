"""One /inference-shaped request end to end, shared by /inference, the OpenAI routes and the async jobs: the
request to an engine Job, the Job's result to the response body (or the image's bytes, for Accept: image/*), and a
wait that cancels the job when the client leaves. No torch here."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from flux_kontext.errors import ClientDisconnected, ServiceError
from flux_kontext.faults import fault_from_headers
from flux_kontext.image_encoding import ImageEncoder
from flux_kontext.jobs import Job, JobResult
from flux_kontext.metrics import GENERATION_MODE
from flux_kontext.request_body import DISCONNECTED
from flux_kontext.schemas import (
    MATCH_INPUT_IMAGE,
    GeneratedImage,
    InferenceRequest,
    InferenceResponse,
)
from flux_kontext.settings import Settings
from utils import MEDIA_TYPES, ImageInputError, decode_image, new_seed

log = logging.getLogger(__name__)


def to_job(request: InferenceRequest, settings: Settings) -> Job:
    """Convert a validated request into an engine job; decodes the image (call off the event loop)."""
    try:
        image = decode_image(request.image, settings.max_input_pixels) if request.image is not None else None
    except ImageInputError as exc:
        raise ServiceError(exc.status, exc.code, exc.message, param="image") from None
    width, height = request.output_size()
    return Job(
        prompt=request.prompt,
        seed=request.seed if request.seed is not None else new_seed(),
        image=image,
        width=width,
        height=height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        true_cfg_scale=request.true_cfg_scale,
        negative_prompt=request.negative_prompt,
        num_images=request.num_images,
        scheduler=request.scheduler,
        cache_threshold=request.cache_threshold,
        flags=request.flags(),
        loras=request.lora_choices(),
    )


def to_response(
    request: InferenceRequest,
    job: Job,
    result: JobResult,
    wait_ms: float,
    model: dict,
    encoder: ImageEncoder = ImageEncoder(),
) -> dict:
    """Build the response body; encodes images (call off the event loop), timed as the ``encoding`` phase."""
    encoding_start = time.perf_counter()
    images = []
    for img, seed in zip(result.images, result.seeds, strict=True):
        data, used = encoder.encode_base64(img, request.output_format, request.encoder_quality)
        images.append(
            GeneratedImage(
                image=data, seed=seed, width=img.width, height=img.height, format=request.output_format, encoder=used
            )
        )
    encoding_ms = round((time.perf_counter() - encoding_start) * 1000.0, 2)
    snapped_ratio = request.aspect_ratio not in (None, MATCH_INPUT_IMAGE)
    return InferenceResponse(
        id=f"req-{uuid.uuid4().hex[:16]}",
        mode="edit" if job.image is not None else "text_to_image",
        prompt=request.prompt,
        images=images,
        size_source="aspect_ratio_snapped" if snapped_ratio else result.size_source,
        context_size=list(result.context_size) if result.context_size else None,
        steps=result.steps,
        scheduler=result.scheduler,
        guidance_scale=request.guidance_scale,
        true_cfg_scale=request.true_cfg_scale,
        true_cfg_active=result.true_cfg,
        first_block_cache=result.first_block_cache,
        cuda_graphs=result.cuda_graphs,
        loras=result.loras,
        timings_ms={"queue_wait": round(wait_ms, 2), **result.timings_ms, "encoding": encoding_ms},
        warnings=result.warnings,
        model=model,
        optimizations=result.optimizations,
    ).model_dump()


async def run_inference(service, request: InferenceRequest, http_request: Request) -> dict:
    """One validated request through the queue, as /inference and the OpenAI routes run it: 503 / 429 before any
    work, the image decoded and the result encoded off the event loop, the job cancelled if the client leaves.
    Returns the /inference response body (total time and metrics recorded)."""
    http_request.scope[GENERATION_MODE] = "edit" if request.image is not None else "text_to_image"
    service.require_ready()
    service.require_room()
    start = time.perf_counter()
    fault = fault_from_headers(http_request.headers, service.settings.fault_injection)  # tests only
    job = await asyncio.to_thread(to_job, request, service.settings)
    job.fault = fault
    result, wait_ms = await until_disconnect(http_request, service.submit(job))
    model = service.engine.describe_model()
    body = await asyncio.to_thread(to_response, request, job, result, wait_ms, model, service.encoder)
    body["timings_ms"]["total"] = round((time.perf_counter() - start) * 1000.0, 2)
    service.metrics.observe_result(body)
    return body


# ----- Accept: image/* on /inference: the image itself, so `curl -o out.png` works ----------------------------------
def image_wanted(accept: str) -> str | None:
    """The output format the Accept header asks for first, if it is an image type we make (else JSON)."""
    for part in accept.split(","):
        kind = part.split(";")[0].strip().lower()
        if kind in ("application/json", "*/*", "application/*"):
            return None
        fmt = next((fmt for fmt, media in MEDIA_TYPES.items() if media == kind), None)
        if fmt is not None:
            return fmt
    return None


def raw_image_request(request: InferenceRequest, fmt: str) -> InferenceRequest:
    """The request answered with one image's bytes: its format is the one accepted, and one image only."""
    if "output_format" in request.model_fields_set and request.output_format != fmt:
        raise ServiceError(406, "not_acceptable", f"Accept asks for {fmt}; output_format is {request.output_format}")
    if request.num_images != 1:
        raise ServiceError(
            406, "not_acceptable", "an image/* response holds one image: send num_images 1, or Accept: application/json"
        )
    return request.model_copy(update={"output_format": fmt})


def image_response(body: dict) -> Response:
    """One image's bytes; what JSON would carry besides it goes into headers (seed, size, timings, what ran)."""
    image = body["images"][0]
    headers = {
        "Content-Disposition": f'inline; filename="{body["id"]}.{image["format"]}"',
        "X-Seed": str(image["seed"]),
        "X-Image-Size": f"{image['width']}x{image['height']}",
        "X-Timings-Total-Ms": str(body["timings_ms"]["total"]),
        "X-Optimizations-Ran": ",".join(body["optimizations"]["ran"]),
    }
    return Response(base64.b64decode(image["image"]), media_type=MEDIA_TYPES[image["format"]], headers=headers)


async def until_disconnect(request: Request, work):
    """Await ``work``; if the client disconnects first, cancel it (the queue then stops the job) and raise
    ClientDisconnected (answered 499, logged in one line)."""
    disconnected: asyncio.Event | None = request.scope.get(DISCONNECTED)
    task = asyncio.ensure_future(work)
    if disconnected is None:
        return await task
    gone = asyncio.ensure_future(disconnected.wait())
    start = time.perf_counter()
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected(f"after {time.perf_counter() - start:.1f} s; its job was stopped")
    finally:
        gone.cancel()
