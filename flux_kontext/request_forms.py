"""Request bodies of /inference and the routes that take its fields: JSON, or multipart/form-data / urlencoded
forms (the image as a file part), validated by the same InferenceRequest model; and the OpenAPI document of that
body. Malformed bodies get a 400/415/422 that says why. No torch here."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flux_kontext.errors import ServiceError
from flux_kontext.schemas import InferenceRequest, request_schema
from flux_kontext.settings import Settings


def form_property(prop: dict) -> dict:
    """A field as a form has it: a form field is text or absent, never null (JSON's ``null`` has no form)."""
    options = [option for option in prop.get("anyOf", ()) if option.get("type") != "null"]
    if len(options) != 1:
        return prop
    rest = {key: value for key, value in prop.items() if key != "anyOf" and not (key == "default" and value is None)}
    if "enum" in rest:
        rest["enum"] = [value for value in rest["enum"] if value is not None]
    return {**rest, **options[0]}


def form_schema(schema: dict) -> dict:
    """A JSON body's schema as form fields, for the OpenAPI document. Swagger UI fills a form's fields from their
    examples: a field whose example is null (not part of the example request) gets the empty field (or list)
    instead, which is not sent or which the server reads as absent (``read_form``), so that the filled-in form is a
    valid request."""
    fields = {name: form_property(field) for name, field in schema["properties"].items()}
    properties = {
        name: {**field, "examples": [[] if field.get("type") == "array" else ""]}
        if field.get("examples") == [None]
        else field
        for name, field in fields.items()
    }
    return {**schema, "properties": properties}


def _inference_body_doc() -> dict:
    """The /inference request body for the OpenAPI document: the JSON model, and the same fields as a form."""
    schema = request_schema()
    form = form_schema(schema)
    form["properties"]["image"] = {
        "type": "string",
        "format": "binary",
        "description": "Input image file (edit): PNG, JPEG or WebP. Omit for text-to-image.",
    }
    example = {"prompt": "make it a winter scene", "aspect_ratio": "16:9", "steps": 14, "seed": 42}
    content = {
        "application/json": {"schema": schema, "example": example},
        "multipart/form-data": {"schema": form},
    }
    return {"requestBody": {"required": True, "content": content}}


INFERENCE_BODY = _inference_body_doc()


MULTIPART_BOUNDARY = re.compile(r"boundary=(?P<b>\"[^\"]+\"|[^;\s]+)", re.IGNORECASE)


@dataclass
class FormBody:
    """A parsed multipart/form-data (or urlencoded) body: text fields (each given once) and file parts by name."""

    fields: dict[str, str]
    files: dict[str, list[bytes]]


async def read_form(http_request: Request, max_bytes: int) -> FormBody:
    """Parse a form body; a malformed one (no boundary, truncated, a field given twice) is a 400 that says why."""
    boundary = MULTIPART_BOUNDARY.search(http_request.headers.get("content-type", ""))
    # python-multipart takes a body cut short for a complete one with fewer fields; its closing delimiter tells.
    if boundary and b"--" + boundary["b"].strip('"').encode("latin-1") + b"--" not in await http_request.body():
        raise ServiceError(400, "invalid_multipart", "multipart body is truncated: its closing boundary is missing")
    try:
        form = await http_request.form(max_part_size=max_bytes, max_files=16, max_fields=64)
    except StarletteHTTPException as exc:
        raise ServiceError(400, "invalid_multipart", f"multipart body could not be parsed: {exc.detail}") from None
    except Exception as exc:  # python-multipart's own parse errors
        raise ServiceError(400, "invalid_multipart", f"multipart body could not be parsed: {exc}") from None
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                if value == "":  # an empty field is one not given: HTML forms (and Swagger UI) send every input
                    continue
                if name in fields:
                    raise ServiceError(400, "invalid_multipart", f"field '{name}' is given more than once", param=name)
                fields[name] = value
            else:
                data = await value.read()
                if data or value.filename:  # no name, no bytes: a file input left empty (as browsers send it)
                    files.setdefault(name, []).append(data)
    finally:
        await form.close()
    return FormBody(fields, files)


ASYNC_ONLY = ("webhook_url", "webhook_events")  # read by the async jobs (protocols/async_jobs.py), not here


def validation_error(exc: ValidationError) -> RequestValidationError:
    """A pydantic error raised outside FastAPI's own body parsing, answered like one (the envelope names fields);
    a webhook field on a synchronous request says where it belongs instead of "unknown field"."""
    errors = exc.errors(include_url=False)
    for error in errors:
        if error["type"] == "extra_forbidden" and error["loc"][:1] in [(name,) for name in ASYNC_ONLY]:
            error.update(
                type="async_only", msg="for async jobs: send 'Prefer: respond-async' or POST the request to /v1/jobs"
            )
    return RequestValidationError(errors)


async def read_inference_request(http_request: Request, settings: Settings) -> InferenceRequest:
    """The /inference body: JSON (as always), or a form (multipart/form-data with the image as a file part or a
    base64 text field; urlencoded without one), every other field a text field, validated by the same model with
    the same defaults."""
    kind = http_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded" and (await http_request.body()).lstrip().startswith(b"{"):
        raise ServiceError(  # curl -d '{...}' without a Content-Type header sends JSON labelled as a form
            415,
            "unsupported_media_type",
            "the body looks like JSON but is labelled a form: add -H 'Content-Type: application/json'",
        )
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await read_form(http_request, settings.max_body_bytes)
        fields: dict[str, object] = dict(form.fields)
        for name, parts in form.files.items():
            if name != "image":
                raise ServiceError(
                    422, "invalid_request", f"field '{name}' is a file part; only 'image' may be a file", param=name
                )
            if len(parts) > 1 or "image" in fields:
                raise ServiceError(
                    422, "invalid_request", "send one 'image': FLUX.1-Kontext edits one image", param="image"
                )
            fields["image"] = base64.b64encode(parts[0]).decode("ascii")
        try:
            return InferenceRequest.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc) from None
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind} is not accepted: send application/json (curl -H 'Content-Type: application/json' "
            "-d '{...}') or multipart/form-data (curl -F image=@in.png -F prompt=...)",
        )
    try:  # strict: a JSON body's types are the document's (no "0.1" for a number, no 0 for false)
        return InferenceRequest.model_validate_json(await http_request.body(), strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from None
