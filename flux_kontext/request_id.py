"""Request ids: ``X-Request-ID`` honoured when it is a short safe token (else one is made up), echoed on every
response, carried in every error body and every log line (asgi-correlation-id's middleware and context variable).

The id lives in a context variable: set by the middleware for the request's task, copied into the tasks it starts
(async jobs) and, by the queue, into the GPU worker thread while that request's job runs.
"""

from __future__ import annotations

import logging
import re
import uuid

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id

HEADER = "X-Request-ID"
# What a proxy or a client may send: a UUID, a trace id, nginx's $request_id, "req-123"... no spaces, no quotes,
# nothing a log line or a header could be split on.
VALID_ID = re.compile(r"[A-Za-z0-9._:=+/@-]{1,128}")


def is_valid_request_id(value: str) -> bool:
    return VALID_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request this code runs for; None outside a request (start-up, the model loader)."""
    return correlation_id.get()


def request_id_middleware() -> tuple[type, dict]:
    """(middleware class, options) for ``app.add_middleware``: outermost, so every response carries the id."""
    options = {"header_name": HEADER, "validator": is_valid_request_id, "generator": new_request_id}
    return CorrelationIdMiddleware, options


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` on every record ("-" outside a request), for the text and the JSON formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = correlation_id.get() or "-"
        return True
