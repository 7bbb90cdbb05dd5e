"""API keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, checked before the request body is read.

Keys come from ``FLUX_API_KEYS`` (the keys) and ``FLUX_API_KEYS_FILE`` (their SHA-256 digests, one
``sha256:<hex>`` a line); none configured: no authentication, as before (with a warning at start). The path policy:

- ``/health/live`` and ``/health/ready`` are always open (orchestrator probes carry no key);
- the playground page (``/`` and its files under ``/playground/``) is always open: static files, no data; the key is
  typed into the page, which sends it with each call;
- ``/health``, ``/metrics``, ``/docs`` (with its files under ``/docs/``), ``/redoc`` and ``/openapi.json`` are open
  unless ``FLUX_AUTH_PROTECT_INFO=true``;
- everything else is keyed: ``/inference``, the OpenAI routes (``/v1/images/*``, ``/v1/models``), ``/v1/jobs`` and
  ``/benchmark``, and unknown paths too (no key, no 404 to probe routes with);
- ``/benchmark`` answers 403 when ``FLUX_BENCHMARK_ENABLED=false`` (checked here: the path is known);
- CORS preflights (``OPTIONS``) pass without a key: browsers never send credentials on them, and no route runs work
  on ``OPTIONS``.

A presented key is hashed and compared with ``hmac.compare_digest`` against every configured digest, all of them
(no early exit that would tell which one matched or how far). 401 (with ``WWW-Authenticate: Bearer``) without a
key, 403 with a wrong one; in the service's envelope, or OpenAI's error shape on the OpenAI routes. Neither the key
nor its digest is logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from flux_kontext.errors import error_response_for_path

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health/live", "/health/ready"})
INFO_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PAGE_PATHS, PAGE_PREFIX = frozenset({"/"}), "/playground/"
INFO_PREFIX = "/docs/"  # Swagger UI's and ReDoc's files (docs_pages.DOCS_ASSETS_URL), the OAuth2 redirect page
BENCHMARK_PATH = "/benchmark"
# Requests that run generations; the per-key concurrency limit counts these (method, path).
GENERATION_ROUTES = frozenset(
    {
        ("POST", "/inference"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/edits"),
        ("POST", "/v1/jobs"),
        ("GET", BENCHMARK_PATH),
    }
)


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key the request carries: ``Authorization: Bearer <key>`` first, else ``X-API-Key``; None without one."""
    values = {}
    for name, value in headers:
        values.setdefault(name.lower(), value)
    authorization = values.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = values.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


def matching_digest(key: str, digests: list[bytes]) -> bytes | None:
    """The configured digest equal to the key's, compared in constant time against every one (no early exit)."""
    presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    found = None
    for digest in digests:
        if hmac.compare_digest(presented, digest):
            found = digest
    return found


class ApiKeyMiddleware:
    """ASGI middleware: authenticates before the body is read, then limits each key's generation requests in flight.

    ``max_requests_per_key`` (``FLUX_MAX_REQUESTS_PER_KEY``, 0: no limit) counts a request from the moment it is
    let through until its response is sent (the whole call of the app), so one key cannot fill the queue: beyond the
    limit, 429 with ``Retry-After``. An async job submission (``POST /v1/jobs``, or ``/inference`` with ``Prefer:
    respond-async``) counts only while it is being submitted (and while a ``Prefer: wait=N`` waits), not while the
    job then runs; the queue's own bound still applies to those. Without keys there is no limit (no identity)."""

    def __init__(self, app, settings=None):
        self.app = app
        self.digests: list[bytes] = list(settings.api_key_digests) if settings is not None else []
        self.protect_info = bool(getattr(settings, "auth_protect_info", False))
        self.benchmark_enabled = bool(getattr(settings, "benchmark_enabled", True))
        self.max_per_key = int(getattr(settings, "max_requests_per_key", 0) or 0)
        self.retry_after_s = int(getattr(settings, "retry_after_s", 5))
        self.in_flight: dict[bytes, int] = {}
        if self.digests:
            log.info(
                "API keys required: %d key(s) configured; info endpoints %s; per-key limit %s",
                len(self.digests),
                "keyed" if self.protect_info else "open",
                self.max_per_key or "none",
            )
        else:
            log.warning(
                "no API keys configured (FLUX_API_KEYS / FLUX_API_KEYS_FILE): the service is unauthenticated; "
                "anyone who reaches its port can generate. Bind it to loopback or set keys"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def is_open(self, path: str) -> bool:
        if path in PROBE_PATHS or path in PAGE_PATHS or path.startswith(PAGE_PREFIX):
            return True
        return (path in INFO_PATHS or path.startswith(INFO_PREFIX)) and not self.protect_info

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        digest = None
        if self.enabled and not self.is_open(path):
            key = presented_key(scope.get("headers") or [])
            if key is None:
                log.info("401 %s %s: no API key", method, path)
                message = "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                headers = {"WWW-Authenticate": "Bearer"}
                return await self.reply(scope, receive, send, 401, "missing_api_key", message, headers)
            digest = matching_digest(key, self.digests)
            del key
            if digest is None:
                log.info("403 %s %s: API key not accepted", method, path)
                message = "the API key is not valid for this service"
                return await self.reply(scope, receive, send, 403, "invalid_api_key", message)
        if path == BENCHMARK_PATH and not self.benchmark_enabled:
            message = (
                "/benchmark is disabled on this server (it occupies the GPU); enable it: FLUX_BENCHMARK_ENABLED=true"
            )
            return await self.reply(scope, receive, send, 403, "benchmark_disabled", message)
        if digest is None or not self.max_per_key or (method, path) not in GENERATION_ROUTES:
            return await self.app(scope, receive, send)
        if self.in_flight.get(digest, 0) >= self.max_per_key:
            log.info("429 %s %s: the key's %d request(s) in flight are its limit", method, path, self.max_per_key)
            message = (
                f"this API key already has {self.max_per_key} generation request(s) in flight "
                "(FLUX_MAX_REQUESTS_PER_KEY); retry when one has finished"
            )
            headers = {"Retry-After": str(self.retry_after_s)}
            return await self.reply(scope, receive, send, 429, "too_many_requests_for_key", message, headers)
        self.in_flight[digest] = self.in_flight.get(digest, 0) + 1
        try:
            return await self.app(scope, receive, send)
        finally:
            remaining = self.in_flight[digest] - 1
            if remaining:
                self.in_flight[digest] = remaining
            else:
                del self.in_flight[digest]

    @staticmethod
    async def reply(scope, receive, send, status: int, type_: str, message: str, headers: dict | None = None):
        response = error_response_for_path(scope["path"], status, type_, message, headers)
        await response(scope, receive, send)
