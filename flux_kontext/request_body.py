"""ASGI middleware that owns the request body: a size limit (413), a bound on the bodies held at once (429), and a
watch for the client leaving.

The body is read here (declared length checked first, chunked bodies counted) and replayed to the app.
Every body counts against ``max_bytes_in_flight`` (FLUX_MAX_BODY_MB_IN_FLIGHT) from before its first byte is read
until its response is sent, since it is held (and decoded: the image, the job) all that time. A body that would take
the total past the limit is refused with 429 and Retry-After before it is read, so a flood of maximal bodies costs
nothing beyond the limit; a body alone is always let in (FLUX_MAX_BODY_MB bounds it), and bodiless requests (probes,
GETs) never wait. A refused body is read and dropped chunk by chunk (no memory) before the 429 is sent, so that the
client, still sending, gets its 429 rather than a reset connection.

Once it is read, a background task keeps listening on the connection; when the client disconnects it sets
the event at ``scope[DISCONNECTED]``, which the routes use to cancel the client's job. (Polling Starlette's
``Request.is_disconnected()`` from a route did not see disconnects through the middleware stack.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from flux_kontext.errors import error_response_for_path

DISCONNECTED = "flux.disconnected"
MIB = 2**20
log = logging.getLogger(__name__)


class BodyBudget:
    """Bytes of request bodies held at once; single-threaded (the event loop), so no lock."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def take(self, size: int) -> bool:
        if self.in_flight and self.in_flight + size > self.limit:
            return False
        self.in_flight += size
        return True

    def give(self, size: int) -> None:
        self.in_flight -= size


class RequestBodyMiddleware:
    def __init__(self, app, max_bytes: int, max_bytes_in_flight: int | None = None, retry_after_s: int = 5):
        self.app = app
        self.max_bytes = max_bytes
        self.budget = BodyBudget(max_bytes_in_flight if max_bytes_in_flight is not None else 64 * max_bytes)
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            return await self._too_large(scope, send, declared, exact=True)
        held = 0  # bytes taken from the budget for this request: given back whatever happens
        try:
            if declared:
                if not self.budget.take(declared):
                    return await self._busy(scope, receive, send, declared)
                held = declared
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    return await self._too_large(scope, send, size, exact=False)
                if size > held:  # chunked, or more than declared (the server refuses that; count it anyway)
                    if not self.budget.take(size - held):
                        return await self._busy(scope, receive, send, size, more=message.get("more_body", False))
                    held = size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            del chunks
            return await self._replay(scope, receive, send, body)
        finally:
            self.budget.give(held)

    async def _replay(self, scope, receive, send, body: bytes):
        disconnected = asyncio.Event()
        scope[DISCONNECTED] = disconnected
        watcher = asyncio.ensure_future(self._watch(receive, disconnected))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        try:
            return await self.app(scope, replay, send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    @staticmethod
    async def _watch(receive, disconnected: asyncio.Event) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                return

    async def _too_large(self, scope, send, size: int, exact: bool) -> None:
        message = (
            f"request body is {'' if exact else 'at least '}{size} bytes; the limit is "
            f"{self.max_bytes} bytes ({self.max_bytes / MIB:g} MiB, FLUX_MAX_BODY_MB)"
        )
        await self._reply(scope, send, 413, "body_too_large", message)

    async def _busy(self, scope, receive, send, size: int, more: bool = True) -> None:
        in_flight, limit = self.budget.in_flight, self.budget.limit
        log.info("429 %s: a %d-byte body with %d bytes of bodies in flight", scope["path"], size, in_flight)
        message = (
            f"server is busy: it holds {in_flight / MIB:.1f} MiB of request bodies and this one ({size / MIB:.1f} MiB) "
            f"would pass the limit of {limit / MIB:g} MiB (FLUX_MAX_BODY_MB_IN_FLIGHT); retry later"
        )
        headers = {"Retry-After": str(self.retry_after_s)}
        if more:  # first: once the response is sent, the server reports the rest of the body as a disconnect
            await self._discard(receive)
        await self._reply(scope, send, 429, "overloaded", message, headers)

    async def _discard(self, receive) -> None:
        """Read the rest of a refused body chunk by chunk, keeping none of it: a client that sends its whole body
        before reading the answer (most do) would otherwise see the connection reset, not the 429."""
        size = 0
        while size <= self.max_bytes:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    @staticmethod
    async def _reply(scope, send, status: int, type_: str, message: str, headers: dict | None = None) -> None:
        async def no_body():
            return {"type": "http.request", "body": b"", "more_body": False}

        await error_response_for_path(scope["path"], status, type_, message, headers)(scope, no_body, send)
