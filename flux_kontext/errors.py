"""Error bodies for every failure, mapped in one place.

The service's own envelope, ``{"error": {"type", "message", "details"?, "request_id"}}``, everywhere but the
OpenAI-compatible routes (``OPENAI_PATHS``), which answer OpenAI's shape exactly, ``{"error": {"message", "type",
"param", "code"}}``, because the OpenAI SDKs parse that (and validation errors there are 400s, as OpenAI's are, not
422s). ``request_id`` is the request's ``X-Request-ID`` (flux_kontext/request_id.py), the key to its log lines; every
response carries that header too, which is where OpenAI's SDKs read an error's ``request_id`` from.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from flux_kontext.request_id import current_request_id

log = logging.getLogger(__name__)
OPENAI_PATHS = ("/v1/images/", "/v1/models")  # not all of /v1: /v1/jobs is ours and keeps our envelope


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its response: never sent, only counted


class ClientDisconnected(Exception):
    """The client closed the connection before its response; its job was stopped. Answered 499 (to nobody: what
    the metrics count) with one log line, never a traceback."""


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine-readable type and a message a person can act on; ``param``
    names the request field at fault, where there is one."""

    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.headers, self.param = status, type_, message, headers, param


def error_response(
    status: int, type_: str, message: str, details: list[dict] | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"type": type_, "message": message}
    if details:
        body["details"] = details
    body["request_id"] = current_request_id()
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def openai_error_type(status: int) -> str:
    """OpenAI's error ``type`` for a status (its own vocabulary; our specific type goes into ``code``)."""
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    status = 400 if status == 422 else status
    body = {"message": message, "type": openai_error_type(status), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def is_openai_path(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATHS)


def error_response_for_path(
    path: str, status: int, type_: str, message: str, headers: dict | None = None
) -> JSONResponse:
    """The error body a route at ``path`` answers (OpenAI's shape on ``OPENAI_PATHS``), for middlewares that answer
    before any route (and without a ``Request``)."""
    if path.startswith(OPENAI_PATHS):
        return openai_error_response(status, type_, message, None, headers)
    return error_response(status, type_, message, None, headers)


def _respond(
    request: Request,
    status: int,
    type_: str,
    message: str,
    details: list[dict] | None = None,
    headers: dict | None = None,
    param: str | None = None,
) -> JSONResponse:
    if is_openai_path(request):
        if param is None and details:
            param = details[0]["field"]
        return openai_error_response(status, type_, message, param, headers)
    return error_response(status, type_, message, details, headers)


def _describe(error: dict) -> dict:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc)
    kind = error.get("type", "")
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = f"unknown field '{field}'"
    elif kind == "missing":
        message = f"field '{field}' is required"
    elif kind == "json_invalid":
        message = f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        field = ""
    elif field:
        message = f"{field}: {message}"
    return {"field": field or None, "type": kind, "message": message}


def allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document lists for this request's path (the routes of included routers too)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^}:]+:path\\\}", ".+", re.escape(template))
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", pattern)
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return _respond(request, exc.status, exc.type, exc.message, headers=exc.headers, param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        details = [_describe(e) for e in exc.errors()]
        return _respond(request, 422, "invalid_request", "; ".join(d["message"] for d in details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        kind = kinds.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # RFC 9110: Allow lists every method of the path (Starlette names one route's)
            allow = ", ".join(allowed_methods(request)) or (headers or {}).get("Allow", "")
            headers = {**(headers or {}), "Allow": allow}
        return _respond(request, exc.status_code, kind, str(exc.detail), headers=headers)

    @app.exception_handler(ClientDisconnected)
    async def _client_disconnected(request: Request, exc: ClientDisconnected):
        log.info("client disconnected from %s %s: %s (499)", request.method, request.url.path, exc)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        message = f"internal error: {type(exc).__name__}; see the server log"
        # Starlette answers this one from outside every middleware: the request id header is added here.
        request_id = current_request_id()
        headers = {"X-Request-ID": request_id} if request_id else None
        return _respond(request, 500, "internal_error", message, headers=headers)
