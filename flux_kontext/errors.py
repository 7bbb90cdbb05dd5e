"""One JSON error envelope for every failure: {"error": {"type", "message", "details"?}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine-readable type and a message a person can act on."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def error_response(
    status: int, type_: str, message: str, details: list[dict] | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"type": type_, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


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
    elif field:
        message = f"{field}: {message}"
    return {"field": field or None, "type": kind, "message": message}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc.status, exc.type, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        details = [_describe(e) for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(d["message"] for d in details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}; see the server log")
