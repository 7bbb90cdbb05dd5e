"""ASGI middleware: refuse request bodies over a size limit with 413, before the app parses them."""

from __future__ import annotations

import json


class BodySizeLimit:
    """Reads the body (declared length checked first, chunked bodies counted) and replays it to the app."""

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
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

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
