"""ASGI middleware that owns the request body: a size limit (413) and a watch for the client leaving.

The body is read here (declared length checked first, chunked bodies counted) and replayed to the app.
Once it is read, a background task keeps listening on the connection; when the client disconnects it sets
the event at ``scope[DISCONNECTED]``, which the routes use to cancel the client's job. (Polling Starlette's
``Request.is_disconnected()`` from a route did not see disconnects through the middleware stack.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json

DISCONNECTED = "flux.disconnected"


class RequestBodyMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send, int(declared), exact=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(send, size, exact=False)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        disconnected = asyncio.Event()
        scope[DISCONNECTED] = disconnected
        watcher = asyncio.ensure_future(self._watch(receive, disconnected))
        body = b"".join(chunks)
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

    async def _reject(self, send, size: int, exact: bool) -> None:
        limit_mb = self.max_bytes / 2**20
        message = (
            f"request body is {'' if exact else 'at least '}{size} bytes; the limit is "
            f"{self.max_bytes} bytes ({limit_mb:g} MiB, FLUX_MAX_BODY_MB)"
        )
        payload = json.dumps({"error": {"type": "body_too_large", "message": message}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
