"""OpenAI images API under /v1: ``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart),
``GET /v1/models``. No torch here.

Each request becomes the same ``InferenceRequest`` that /inference validates, and runs through the same
``run_inference`` (readiness, queue room, job, timeouts, metrics), so every rule and default is the one /inference
has. OpenAI's options map onto it (``n`` -> num_images, ``size`` -> width/height, ``output_compression`` -> the
JPEG/WebP quality); the engine's own knobs (seed, steps, scheduler, ...) come as extra fields, the SDK's
``extra_body``. An OpenAI option this server cannot honour is a 400 naming it, never ignored: only metadata that
cannot change the image (``user``, ``safety_identifier``) is accepted and dropped. Errors have OpenAI's shape
(errors.py). FLUX.1-Kontext edits one context image: an edit with several images is a 400.
"""

from __future__ import annotations

import base64
import json
import re
import time

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from flux_kontext.errors import ServiceError
from flux_kontext.inference import run_inference
from flux_kontext.request_forms import form_schema, read_form
from flux_kontext.schemas import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, InferenceRequest, request_schema
from flux_kontext.service import Service

# Our request fields a client may send as extras (extra_body), with the meaning and limits they have on /inference.
EXTRAS = (
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "true_cfg_scale",
    "negative_prompt",
    "cache_threshold",
    "use_flash_attention",
    "use_mxfp4",
    "use_dpm_solver",
    "use_cuda_graphs",
    "loras",
)
MAPPED = ("prompt", "model", "n", "size", "output_format", "output_compression", "response_format")
METADATA = ("user", "safety_identifier")  # cannot change the image: accepted and dropped
# OpenAI options and the only values of them this server honours (any other value, or any value where none is
# listed, is a 400 with the reason).
HONOURED = {"response_format": ("b64_json",), "quality": ("auto",), "background": ("auto", "opaque")}
WHY_NOT = {
    "response_format": "images are returned inline only: use 'b64_json' (the default here)",
    "quality": "FLUX.1-Kontext has no quality levels: use 'auto', and the steps extra for speed against detail",
    "background": "FLUX.1-Kontext makes opaque images: use 'auto' or 'opaque'",
    "mask": "FLUX.1-Kontext edits from the instruction alone; masked inpainting is not supported",
    "style": "a DALL-E 3 option with no FLUX.1-Kontext equivalent",
    "moderation": "this server runs no content moderation",
    "input_fidelity": "FLUX.1-Kontext has no input fidelity setting",
    "stream": "streaming is not supported on this endpoint",
    "partial_images": "partial images need streaming, which this endpoint does not support",
}
RENAMED = {"num_images": "n", "output_quality": "output_compression"}  # our field -> the OpenAI name a client sent
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def bad_request(message: str, param: str | None, code: str = "invalid_request") -> ServiceError:
    return ServiceError(400, code, message, param=param)


def _absent(value) -> bool:
    return value is None or value == "" or value is False or value == "false" or value == 0 or value == "0"


def check_options(fields: dict) -> None:
    """400 for every option this server cannot honour, and for fields it does not know."""
    for name, value in fields.items():
        if name in HONOURED and value in HONOURED[name]:
            continue
        if name in WHY_NOT and (name in HONOURED or not _absent(value)):
            raise bad_request(f"{name}={value!r} is not supported: {WHY_NOT[name]}", name, "unsupported_parameter")
        if name not in (*MAPPED, *EXTRAS, *METADATA, *WHY_NOT):
            raise bad_request(f"unknown parameter '{name}'", name, "unknown_parameter")


def output_size(size, edit: bool) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); 'auto' (or none) -> the engine's choice: the input's aspect snapped (edit), else 1024²."""
    if size in (None, "", "auto"):
        return None, None
    match = _SIZE.match(str(size).strip())
    sides = (int(match[1]), int(match[2])) if match else ()
    if not sides or not all(MIN_SIDE <= side <= MAX_SIDE and side % SIZE_MULTIPLE == 0 for side in sides):
        reason = f"sides must be multiples of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, e.g. '1024x1024'"
        follows = "the input's aspect ratio" if edit else "1024x1024"
        raise bad_request(f"size {size!r} is not available: {reason}, or 'auto' ({follows})", "size")
    return sides


def to_inference_request(fields: dict, image: str | None, model_id: str) -> InferenceRequest:
    """OpenAI fields (None meaning absent) -> the /inference request, or a 400 naming the OpenAI parameter."""
    fields = {name: value for name, value in fields.items() if value is not None}
    check_options(fields)
    if fields.get("model") not in (None, model_id):
        message = f"model {fields['model']!r} is not served here; this server serves {model_id!r} (GET /v1/models)"
        raise ServiceError(404, "model_not_found", message, param="model")
    if "output_compression" in fields and fields.get("output_format", "png") == "png":
        raise bad_request("output_compression applies to jpeg and webp only; png is lossless", "output_compression")
    width, height = output_size(fields.get("size"), edit=image is not None)
    body = {name: fields[name] for name in EXTRAS if name in fields}
    body.update(prompt=fields.get("prompt"), image=image, width=width, height=height)
    body.update(num_images=fields.get("n"), output_format=fields.get("output_format"))
    body["output_quality"] = fields.get("output_compression")
    try:
        return InferenceRequest.model_validate({name: value for name, value in body.items() if value is not None})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:
            error["loc"] = tuple(RENAMED.get(str(part), part) for part in error["loc"])
        raise RequestValidationError(errors) from None


async def inference_in_openai_terms(service: Service, request: InferenceRequest, http_request: Request) -> dict:
    """``run_inference``; an error naming one of our fields (the memory plan's limit on num_images, say) names the
    OpenAI parameter the client sent instead."""
    try:
        return await run_inference(service, request, http_request)
    except ServiceError as exc:
        if exc.param in RENAMED:
            ours, theirs = exc.param, RENAMED[exc.param]
            exc.param, exc.message = theirs, exc.message.replace(f"{ours}=", f"{theirs}=")
        raise


def openai_response(request: InferenceRequest, body: dict) -> dict:
    """OpenAI's ImagesResponse, with our report (seeds, steps, scheduler, timings, what ran) as extra fields."""
    first = body["images"][0]
    return {
        "created": int(time.time()),
        "data": [{"b64_json": image["image"]} for image in body["images"]],
        "background": "opaque",
        "output_format": request.output_format,
        "quality": "auto",
        "size": f"{first['width']}x{first['height']}",
        "id": body["id"],
        "seeds": [image["seed"] for image in body["images"]],
        **{key: body[key] for key in ("steps", "scheduler", "guidance_scale", "true_cfg_scale", "true_cfg_active")},
        **{key: body[key] for key in ("size_source", "context_size", "timings_ms", "optimizations", "warnings")},
        **{key: body[key] for key in ("first_block_cache", "cuda_graphs", "loras", "model")},
    }


async def json_object(http_request: Request) -> dict:
    kind = http_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json":
        raise ServiceError(415, "unsupported_media_type", f"send application/json, not {kind}")
    try:
        fields = json.loads(await http_request.body())
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON ({exc})", None) from None
    if not isinstance(fields, dict):
        raise bad_request("request body must be a JSON object", None)
    return fields


async def edit_fields(http_request: Request, max_bytes: int) -> tuple[dict, str]:
    """The multipart edit: its text fields and its one image (base64), or a 400 that says what is wrong."""
    kind = http_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise ServiceError(415, "unsupported_media_type", f"send multipart/form-data with an image file, not {kind}")
    form = await read_form(http_request, max_bytes)
    fields: dict = dict(form.fields)
    images = [part for name in ("image", "image[]") for part in form.files.get(name, [])]
    images += [fields.pop(name) for name in ("image", "image[]") if name in fields]  # base64 text also works
    for name in form.files:
        if name not in ("image", "image[]"):
            check_options({name: "a file"})
            raise bad_request(f"unexpected file part '{name}'", name)
    if not images:
        raise bad_request("an edit needs an image: send it as the 'image' file part", "image")
    if len(images) > 1:
        message = f"{len(images)} images sent; FLUX.1-Kontext edits one context image: send one 'image'"
        raise bad_request(message, "image")
    image = images[0]
    return fields, image if isinstance(image, str) else base64.b64encode(image).decode("ascii")


def model_card(service: Service, created: int) -> dict:
    model = service.engine.describe_model()
    owner = model["source"].split("/")[0] if "/" in model["source"] and model["kind"] == "hub" else "local"
    extra = {"kind": model["kind"], "demo": model["demo"], "ready": service.engine.ready}
    return {"id": model["source"], "object": "model", "created": created, "owned_by": owner, **extra}


def body_doc(edit: bool) -> dict:
    """The request body for the OpenAPI document: OpenAI's fields we honour, then our extras as /inference has them."""
    ours = request_schema()["properties"]
    text = {"type": "string"}
    properties = {
        "prompt": {**ours["prompt"], "description": "Instruction (edit) or description."},
        "model": {**text, "description": "Optional; the id GET /v1/models lists.", "examples": [None]},
        "n": {"type": "integer", "minimum": 1, "maximum": 4, "default": 1, "description": "Image i has seed + i."},
        "size": {**text, "default": "auto", "description": "'WxH' (256-1568, multiples of 16) or 'auto'."},
        "output_format": {"enum": ["png", "jpeg", "webp"], "default": "png"},
        "output_compression": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100,
            "description": "JPEG/WebP quality.",
            "examples": [None],
        },
        "response_format": {"enum": ["b64_json"], "default": "b64_json"},
        **{name: ours[name] for name in EXTRAS},
    }
    example = {"prompt": "a lighthouse at dawn", "size": "1248x832", "n": 1, "seed": 42, "steps": 14}
    if edit:
        image = {"type": "string", "format": "binary", "description": "The one image to edit (PNG, JPEG, WebP)."}
        properties = {"image": image, **properties}
        schema = form_schema({"type": "object", "required": ["image", "prompt"], "properties": properties})
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
    schema = {"type": "object", "required": ["prompt"], "properties": properties}
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


OPENAI_ERROR = {
    "description": "An error in OpenAI's shape (the request id is in the X-Request-ID header)",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "code"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                    }
                },
            }
        }
    },
}
# Validation errors are 400s here, as OpenAI's are.
GENERATION_ERRORS = {status: OPENAI_ERROR for status in (400, 401, 403, 404, 406, 413, 415, 429, 503, 504)}


def build_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI images"])
    created = int(time.time())

    def served_id() -> str:
        return service.engine.describe_model()["source"]

    @router.post("/images/generations", openapi_extra=body_doc(edit=False), responses=GENERATION_ERRORS)
    async def generations(http_request: Request):
        """OpenAI ``images.generate``: text-to-image. JSON body; extras (seed, steps, ...) as extra fields."""
        fields = await json_object(http_request)
        request = to_inference_request(fields, None, served_id())
        body = await inference_in_openai_terms(service, request, http_request)
        return JSONResponse(openai_response(request, body))

    @router.post("/images/edits", openapi_extra=body_doc(edit=True), responses=GENERATION_ERRORS)
    async def edits(http_request: Request):
        """OpenAI ``images.edit``: multipart with one ``image`` (or ``image[]``) file part; extras as form fields."""
        fields, image = await edit_fields(http_request, service.settings.max_body_bytes)
        request = to_inference_request(fields, image, served_id())
        body = await inference_in_openai_terms(service, request, http_request)
        return JSONResponse(openai_response(request, body))

    @router.get("/models")
    async def models():
        """The one model this server serves, as an OpenAI model object."""
        return {"object": "list", "data": [model_card(service, created)]}

    @router.get("/models/{model_id:path}", responses={404: OPENAI_ERROR})
    async def model(model_id: str):
        card = model_card(service, created)
        if model_id != card["id"]:
            raise ServiceError(404, "model_not_found", f"model {model_id!r} is not served here", param="model")
        return card

    return router
